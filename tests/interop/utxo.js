#!/usr/bin/env node
// Interop helper for kmsq tests: builds, signs, verifies and finalizes BitGo
// 2-of-3 wallet PSBTs with BitGo's own library, @bitgo/utxo-lib.
//
//   node tests/interop/utxo.js <build|verify|finalize|sign|keys>  < request.json
//
// Reads one JSON object from stdin, writes one JSON object to stdout. On any
// error: one-line message on stderr, exit status 1.
//
//   build    {network, xpubs: [user, backup, bitgo], inputs: [{scriptType, signer,
//             cosigner, index, value, nonWitnessUtxo?}], outputs?: [{scriptType,
//             chain?, index, value} | {address, value}], globalXpubs?}   -> {psbt}
//   verify   {network, xpubs, psbt} -> {inputs: [{index, signedBy: {user, backup, bitgo}}]}
//   finalize {network, psbt}        -> {tx, txid}
//   sign     {network, psbt, xprv}  -> {psbt}
//   keys     {}                     -> {xprvs: [3], xpubs: [3]}
//   script   {pubkeys: [user, backup, bitgo] (compressed, hex), scriptType} -> {scriptPubKey}
//
// network: bitcoin | testnet | litecoin | litecoinTest. Keys are depth-0 BIP32
// roots in base58 (xpub/xprv version bytes on every network). PSBTs are hex.
'use strict';

const crypto = require('crypto');
const utxolib = require('@bitgo/utxo-lib');

const { bitgo } = utxolib;
const KEY_NAMES = ['user', 'backup', 'bitgo'];
// Only the networks kmsq cares about; others (bch, zcash, ...) have special rules.
const NETWORKS = ['bitcoin', 'testnet', 'litecoin', 'litecoinTest'];

function fail(message) {
  throw new Error(message);
}

function getNetwork(name) {
  if (!NETWORKS.includes(name)) fail(`unsupported network ${JSON.stringify(name)} (use one of ${NETWORKS.join(', ')})`);
  return utxolib.networks[name];
}

// BitGo wallet keys are depth-0 BIP32 roots serialized with mainnet version
// bytes (xpub/xprv) whatever the coin network, so parse them as bitcoin keys.
function parseRootKey(b58, what) {
  if (typeof b58 !== 'string') fail(`${what} must be a base58 string`);
  const node = utxolib.bip32.fromBase58(b58);
  if (node.depth !== 0) fail(`${what} must be a depth-0 root key, got depth ${node.depth}`);
  return node;
}

function getRootWalletKeys(xpubs) {
  if (!Array.isArray(xpubs) || xpubs.length !== 3) fail('xpubs must be [userXpub, backupXpub, bitgoXpub]');
  // Default derivation prefix "0/0": keys are derived at m/0/0/<chain>/<index>.
  return new bitgo.RootWalletKeys(xpubs.map((x, i) => parseRootKey(x, `xpubs[${i}] (${KEY_NAMES[i]})`)));
}

function readPsbt(req) {
  if (typeof req.psbt !== 'string') fail('psbt must be a hex string');
  return bitgo.createPsbtFromHex(req.psbt, getNetwork(req.network));
}

function toSats(v, what) {
  if (!Number.isSafeInteger(v) || v <= 0) fail(`${what} must be a positive integer (sats)`);
  return BigInt(v);
}

function checkScriptType(network, scriptType, what) {
  if (!bitgo.outputScripts.isScriptType2Of3(scriptType)) fail(`${what}: unknown scriptType ${JSON.stringify(scriptType)}`);
  if (!bitgo.outputScripts.isSupportedScriptType(network, scriptType)) {
    fail(`${what}: scriptType ${scriptType} is not supported on ${utxolib.getNetworkName(network)}`);
  }
}

function sha256(s) {
  return crypto.createHash('sha256').update(s).digest('hex');
}

// ---------------------------------------------------------------- build

function build(req) {
  const network = getNetwork(req.network);
  const rootWalletKeys = getRootWalletKeys(req.xpubs);
  if (!Array.isArray(req.inputs) || req.inputs.length === 0) fail('inputs must be a non-empty array');

  const psbt = bitgo.createPsbtForNetwork({ network });
  if (req.globalXpubs) bitgo.addXpubsToPsbt(psbt, rootWalletKeys);

  let total = BigInt(0);
  req.inputs.forEach((inp, i) => {
    const what = `inputs[${i}]`;
    checkScriptType(network, inp.scriptType, what);
    for (const k of ['signer', 'cosigner']) {
      if (!KEY_NAMES.includes(inp[k])) fail(`${what}: ${k} must be one of ${KEY_NAMES.join(', ')}`);
    }
    if (inp.signer === inp.cosigner) fail(`${what}: signer and cosigner must differ`);
    if (!Number.isSafeInteger(inp.index) || inp.index < 0) fail(`${what}: index must be a non-negative integer`);
    const value = toSats(inp.value, `${what}.value`);
    total += value;

    // Wallet deposits are received on the external chain of the script type.
    const chain = bitgo.getExternalChainCode(inp.scriptType);
    const address = bitgo.getWalletAddress(rootWalletKeys, chain, inp.index, network);
    const unspent = { address, chain, index: inp.index, value };

    let skipNonWitnessUtxo = true;
    if (inp.nonWitnessUtxo) {
      if (inp.scriptType !== 'p2sh') fail(`${what}: nonWitnessUtxo is only meaningful for p2sh inputs`);
      // A fabricated previous tx paying `value` to this input's script; its
      // real txid becomes the outpoint so the nonWitnessUtxo hash check holds.
      // vout = i keeps outpoints distinct when two inputs share script+value.
      const { script } = bitgo.toOutput(unspent, network);
      const prevTx = utxolib.testutil.mockPrevTx(i, script, value, network);
      unspent.id = bitgo.formatOutputId({ txid: prevTx.getId(), vout: i });
      unspent.prevTx = prevTx.toBuffer();
      skipNonWitnessUtxo = false;
    } else {
      // Deterministic fake outpoint, unique per input position.
      unspent.id = bitgo.formatOutputId({ txid: sha256(`kmsq-interop-fake-txid/${i}`), vout: 0 });
    }
    // Without skipNonWitnessUtxo utxo-lib demands prevTx for p2sh inputs; with
    // it, p2sh inputs carry a witnessUtxo ("PSBT-lite"). Segwit/taproot inputs
    // always carry a witnessUtxo.
    bitgo.addWalletUnspentToPsbt(psbt, unspent, rootWalletKeys, inp.signer, inp.cosigner, { skipNonWitnessUtxo });
  });

  let outputs = req.outputs;
  if (outputs === undefined) {
    // One change output (internal chain) of the first input's type, small fee.
    const fee = BigInt(1000 * req.inputs.length);
    if (total <= fee) fail(`total input value ${total} too small for default fee ${fee}`);
    outputs = [{ scriptType: req.inputs[0].scriptType, index: 0, value: Number(total - fee) }];
  }
  if (!Array.isArray(outputs) || outputs.length === 0) fail('outputs must be a non-empty array');
  outputs.forEach((out, i) => {
    const what = `outputs[${i}]`;
    if (out.address !== undefined) {
      // A payment: any address of the network, outside the wallet.
      const script = utxolib.address.toOutputScript(out.address, network);
      psbt.addOutput({ script, value: toSats(out.value, `${what}.value`) });
      return;
    }
    checkScriptType(network, out.scriptType, what);
    let chain = out.chain;
    if (chain === undefined) {
      chain = bitgo.getInternalChainCode(out.scriptType);
    } else if (!bitgo.isChainCode(chain) || bitgo.scriptTypeForChain(chain) !== out.scriptType) {
      fail(`${what}: chain ${JSON.stringify(chain)} is not a ${out.scriptType} chain`);
    }
    if (!Number.isSafeInteger(out.index) || out.index < 0) fail(`${what}: index must be a non-negative integer`);
    bitgo.addWalletOutputToPsbt(psbt, rootWalletKeys, chain, out.index, toSats(out.value, `${what}.value`));
  });

  return { psbt: psbt.toHex() };
}

// ---------------------------------------------------------------- verify

// Sighash byte a signature commits to. Schnorr (and MuSig2 partial) sigs of
// the base length imply SIGHASH_DEFAULT; one extra byte carries the type.
function sigHashOf(sig, baseLen) {
  if (baseLen === undefined) return sig[sig.length - 1]; // DER + hashtype
  if (sig.length === baseLen) return utxolib.Transaction.SIGHASH_DEFAULT;
  if (sig.length === baseLen + 1) {
    // BIP341: an explicit 0x00 byte makes the signature invalid on chain,
    // even though utxo-lib's finalizer silently strips it.
    if (sig[baseLen] === utxolib.Transaction.SIGHASH_DEFAULT) fail('65-byte schnorr signature with explicit SIGHASH_DEFAULT');
    return sig[baseLen];
  }
  fail(`bad signature length ${sig.length}`);
}

// All signatures on a (non-finalized) input, as {pubkey, sighash, xOnly}.
function signaturesOf(input) {
  if (input.tapKeySig) fail('unexpected tapKeySig (BitGo only aggregates MuSig2 at finalization)');
  const sigs = [];
  for (const s of input.partialSig || []) sigs.push({ pubkey: s.pubkey, sighash: sigHashOf(s.signature), xOnly: false });
  for (const s of input.tapScriptSig || []) sigs.push({ pubkey: s.pubkey, sighash: sigHashOf(s.signature, 64), xOnly: true });
  for (const s of bitgo.musig2.parsePsbtMusig2PartialSigs(input) || []) {
    sigs.push({ pubkey: s.participantPubKey, sighash: sigHashOf(s.partialSig, 32), xOnly: true });
  }
  return sigs;
}

function samePubkey(a, b, xOnly) {
  const { toXOnlyPublicKey } = bitgo.outputScripts;
  return xOnly ? toXOnlyPublicKey(a).equals(toXOnlyPublicKey(b)) : a.equals(b);
}

function verify(req) {
  const psbt = readPsbt(req);
  const rootWalletKeys = getRootWalletKeys(req.xpubs);
  const inputs = psbt.data.inputs.map((input, i) => {
    try {
      if (bitgo.isPsbtInputFinalized(input)) fail('input is already finalized');
      // utxo-lib's own answer: true iff the key's signature is present AND valid.
      // It returns false (not an error) for a present but invalid signature,
      // so below we also account for every signature present on the input.
      const valid = psbt.getSignatureValidationArray(i, { rootNodes: rootWalletKeys.triple });
      const sigs = signaturesOf(input);
      const isTaproot = psbt.isTaprootInput(i);
      const expectedSighash =
        input.sighashType !== undefined
          ? input.sighashType
          : isTaproot
          ? utxolib.Transaction.SIGHASH_DEFAULT
          : utxolib.Transaction.SIGHASH_ALL;
      for (const s of sigs) {
        if (s.sighash !== expectedSighash) fail(`signature sighash ${s.sighash} != input sighash ${expectedSighash}`);
      }
      let matched = 0;
      const signedBy = {};
      KEY_NAMES.forEach((name, k) => {
        // Derived via the input's (tap)bip32Derivation entries; undefined if
        // this key is not a party to the input (e.g. the unused p2tr leaf key).
        const pubkey = bitgo.UtxoPsbt.deriveKeyPairForInput(rootWalletKeys.triple[k], input);
        const present = pubkey ? sigs.filter((s) => samePubkey(s.pubkey, pubkey, s.xOnly)).length : 0;
        if (present && !valid[k]) fail(`invalid signature by ${name}`);
        if (!present && valid[k]) fail(`utxo-lib reports a ${name} signature that is not present`);
        matched += present;
        signedBy[name] = valid[k];
      });
      if (matched !== sigs.length) fail(`${sigs.length - matched} signature(s) by keys not in this wallet input`);
      return { index: i, signedBy };
    } catch (e) {
      fail(`input ${i}: ${e.message}`);
    }
  });
  return { inputs };
}

// ---------------------------------------------------------------- finalize

function finalize(req) {
  const psbt = readPsbt(req);
  psbt.data.inputs.forEach((input, i) => {
    let ok;
    try {
      // Validates every signature present (ECDSA, tapscript or MuSig2 partial).
      ok = psbt.validateSignaturesOfInputCommon(i);
    } catch (e) {
      fail(`input ${i}: ${e.message}`);
    }
    if (!ok) fail(`input ${i}: invalid signature`);
  });
  // Fails unless each input has enough signatures (2-of-3 / both MuSig2 partials).
  psbt.finalizeAllInputs();
  // Default fee-rate sanity check (max 5000 sat/vB) stays on, as in BitGo's SDK.
  const tx = psbt.extractTransaction();
  return { tx: tx.toHex(), txid: tx.getId() };
}

// ---------------------------------------------------------------- sign

function sign(req) {
  const psbt = readPsbt(req);
  const node = parseRootKey(req.xprv, 'xprv');
  if (node.isNeutered()) fail('xprv must be a private key');
  let signed = 0;
  psbt.data.inputs.forEach((input, i) => {
    // MuSig2 key path needs a nonce round; not supported by this helper.
    if (psbt.isTaprootKeyPathInput(i)) return;
    // Skip inputs this key is not a party to (e.g. bitgo on a user/backup p2tr leaf).
    if (!bitgo.UtxoPsbt.deriveKeyPairForInput(node, input)) return;
    try {
      // Uses the input's sighashType (SIGHASH_ALL, or SIGHASH_DEFAULT for taproot).
      psbt.signInputHD(i, node);
    } catch (e) {
      fail(`input ${i}: ${e.message}`);
    }
    signed++;
  });
  if (!signed) fail('xprv cannot sign any input of this psbt');
  return { psbt: psbt.toHex() };
}

// ---------------------------------------------------------------- keys

function keys() {
  const nodes = KEY_NAMES.map(() => utxolib.bip32.fromSeed(crypto.randomBytes(64)));
  return { xprvs: nodes.map((n) => n.toBase58()), xpubs: nodes.map((n) => n.neutered().toBase58()) };
}

// ---------------------------------------------------------------- script

function script(req) {
  if (!Array.isArray(req.pubkeys) || req.pubkeys.length !== 3) fail('pubkeys: three compressed keys (hex)');
  if (!bitgo.outputScripts.isScriptType2Of3(req.scriptType)) fail(`unknown scriptType ${JSON.stringify(req.scriptType)}`);
  const pubkeys = req.pubkeys.map((hex) => Buffer.from(String(hex), 'hex'));
  return { scriptPubKey: bitgo.outputScripts.createOutputScript2of3(pubkeys, req.scriptType).scriptPubKey.toString('hex') };
}

// ---------------------------------------------------------------- main

const COMMANDS = { build, verify, finalize, sign, keys, script };

function main() {
  const cmd = process.argv[2];
  try {
    if (!Object.prototype.hasOwnProperty.call(COMMANDS, cmd)) {
      fail(`usage: utxo.js <${Object.keys(COMMANDS).join('|')}> < request.json`);
    }
    const text = require('fs').readFileSync(0, 'utf8');
    let req;
    try {
      req = JSON.parse(text);
    } catch (e) {
      fail(`stdin is not JSON: ${e.message}`);
    }
    if (req === null || typeof req !== 'object' || Array.isArray(req)) fail('stdin must be one JSON object');
    process.stdout.write(JSON.stringify(COMMANDS[cmd](req)) + '\n');
  } catch (e) {
    process.stderr.write(`utxo.js ${cmd || ''}: ${String(e && e.message ? e.message : e).replace(/\s+/g, ' ')}\n`);
    process.exitCode = 1;
  }
}

main();
