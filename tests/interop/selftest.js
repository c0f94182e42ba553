// Self-test for utxo.js: drives the CLI exactly as kmsq's tests do (one
// process per command, JSON on stdin/stdout) and checks every answer.
'use strict';

const path = require('path');
const { spawnSync } = require('child_process');
const assert = require('assert');

const TOOL = path.join(__dirname, 'utxo.js');

function run(cmd, req, { expectFail = false } = {}) {
  const r = spawnSync(process.execPath, [TOOL, cmd], { input: JSON.stringify(req), encoding: 'utf8' });
  if (expectFail) {
    assert.strictEqual(r.status, 1, `${cmd} should have failed, got: ${r.stdout}`);
    assert.strictEqual(r.stdout, '', 'no stdout on failure');
    assert.match(r.stderr, /^[^\n]+\n$/, 'one-line error message');
    return r.stderr.trim();
  }
  if (r.status !== 0) throw new Error(`${cmd} failed (${r.status}): ${r.stderr.trim()}`);
  return JSON.parse(r.stdout);
}

const NAME_INDEX = { user: 0, backup: 1, bitgo: 2 };

function signedBy(res) {
  return res.inputs.map((i) => Object.keys(i.signedBy).filter((k) => i.signedBy[k]).sort().join('+') || '-');
}

function expectSigned(network, xpubs, psbt, expected) {
  const res = run('verify', { network, xpubs, psbt });
  assert.deepStrictEqual(signedBy(res), expected);
  res.inputs.forEach((inp, i) => assert.strictEqual(inp.index, i));
}

// Flip one bit inside the first signature found in the PSBT hex (in the
// raw signature bytes, so the PSBT still parses).
function corruptFirstSignature(network, psbtHex) {
  const utxolib = require('@bitgo/utxo-lib');
  const psbt = utxolib.bitgo.createPsbtFromHex(psbtHex, utxolib.networks[network]);
  const input = psbt.data.inputs[0];
  const sig = (input.partialSig && input.partialSig[0]) || (input.tapScriptSig && input.tapScriptSig[0]);
  const bytes = sig.signature;
  bytes[bytes.length - 10] ^= 1;
  return psbt.toHex();
}

// Independent check of the extracted transaction with utxo-lib's
// transaction-level verifier: every input must carry 2 valid signatures.
function checkFinalTx(network, psbtHex, { tx, txid }) {
  const utxolib = require('@bitgo/utxo-lib');
  const net = utxolib.networks[network];
  const psbt = utxolib.bitgo.createPsbtFromHex(psbtHex, net);
  const prevOutputs = psbt.data.inputs.map((input, i) => {
    if (input.witnessUtxo) return input.witnessUtxo;
    const prevTx = utxolib.bitgo.createTransactionFromBuffer(input.nonWitnessUtxo, net, { amountType: 'bigint' });
    return prevTx.outs[psbt.txInputs[i].index];
  });
  const t = utxolib.bitgo.createTransactionFromHex(tx, net, { amountType: 'bigint' });
  assert.strictEqual(t.getId(), txid);
  t.ins.forEach((_, i) => {
    const v = utxolib.bitgo.getSignatureVerifications(t, i, prevOutputs[i].value, undefined, prevOutputs);
    assert.strictEqual(v.filter((x) => x.signedBy).length, 2, `tx input ${i} should have 2 valid signatures`);
  });
}

let count = 0;
function check(label, fn) {
  fn();
  count++;
  console.log(`ok ${count} - ${label}`);
}

const keys = run('keys', {});
assert.strictEqual(keys.xprvs.length, 3);
assert.ok(keys.xpubs.every((x) => x.startsWith('xpub')));
const { xprvs, xpubs } = keys;

const CASES = [
  { scriptType: 'p2sh', signer: 'user', cosigner: 'bitgo' },
  { scriptType: 'p2sh', signer: 'user', cosigner: 'bitgo', nonWitnessUtxo: true },
  { scriptType: 'p2shP2wsh', signer: 'user', cosigner: 'bitgo' },
  { scriptType: 'p2wsh', signer: 'user', cosigner: 'bitgo' },
  { scriptType: 'p2tr', signer: 'user', cosigner: 'backup' },
  { scriptType: 'p2tr', signer: 'backup', cosigner: 'bitgo' },
];

for (const network of ['testnet', 'litecoin']) {
  for (const c of CASES) {
    if (network === 'litecoin' && c.scriptType === 'p2tr') continue;
    const label = `${network} ${c.scriptType}${c.nonWitnessUtxo ? ' nonWitnessUtxo' : ''} ${c.signer}+${c.cosigner}`;
    check(label, () => {
      const input = { ...c, index: 7, value: 100000 };
      const unsigned = run('build', { network, xpubs, inputs: [input] }).psbt;
      expectSigned(network, xpubs, unsigned, ['-']);
      run('finalize', { network, psbt: unsigned }, { expectFail: true });

      const half = run('sign', { network, psbt: unsigned, xprv: xprvs[NAME_INDEX[c.signer]] }).psbt;
      expectSigned(network, xpubs, half, [c.signer]);
      run('finalize', { network, psbt: half }, { expectFail: true });

      // A corrupted signature must be an error, never "not signed".
      const bad = corruptFirstSignature(network, half);
      const msg = run('verify', { network, xpubs, psbt: bad }, { expectFail: true });
      assert.match(msg, /input 0/);
      run('finalize', { network, psbt: bad }, { expectFail: true });

      const full = run('sign', { network, psbt: half, xprv: xprvs[NAME_INDEX[c.cosigner]] }).psbt;
      expectSigned(network, xpubs, full, [[c.signer, c.cosigner].sort().join('+')]);
      const final = run('finalize', { network, psbt: full });
      assert.match(final.tx, /^[0-9a-f]+$/);
      assert.match(final.txid, /^[0-9a-f]{64}$/);
      checkFinalTx(network, full, final);
    });
  }
}

check('testnet: one input of each type in one PSBT (taproot sighash covers all prevouts)', () => {
  const network = 'testnet';
  const inputs = [
    { scriptType: 'p2sh', signer: 'user', cosigner: 'bitgo', index: 0, value: 50000, nonWitnessUtxo: true },
    { scriptType: 'p2sh', signer: 'user', cosigner: 'bitgo', index: 1, value: 60000 },
    { scriptType: 'p2shP2wsh', signer: 'user', cosigner: 'bitgo', index: 2, value: 70000 },
    { scriptType: 'p2wsh', signer: 'user', cosigner: 'bitgo', index: 3, value: 80000 },
    { scriptType: 'p2tr', signer: 'user', cosigner: 'bitgo', index: 4, value: 90000 },
  ];
  const outputs = [
    { scriptType: 'p2wsh', index: 0, value: 100000 }, // change (internal chain 21)
    { scriptType: 'p2tr', chain: 30, index: 9, value: 140000 },
  ];
  const unsigned = run('build', { network, xpubs, inputs, outputs }).psbt;
  const half = run('sign', { network, psbt: unsigned, xprv: xprvs[0] }).psbt;
  expectSigned(network, xpubs, half, inputs.map(() => 'user'));
  const full = run('sign', { network, psbt: half, xprv: xprvs[2] }).psbt;
  expectSigned(network, xpubs, full, inputs.map(() => 'bitgo+user'));
  checkFinalTx(network, full, run('finalize', { network, psbt: full }));
  // The backup key can sign the p2ms inputs but is not a party to the user/bitgo p2tr leaf.
  const withBackup = run('sign', { network, psbt: unsigned, xprv: xprvs[1] }).psbt;
  expectSigned(network, xpubs, withBackup, ['backup', 'backup', 'backup', 'backup', '-']);
});

check('testnet: p2trMusig2 user/bitgo key-path input builds and nobody has signed', () => {
  const network = 'testnet';
  const inputs = [{ scriptType: 'p2trMusig2', signer: 'user', cosigner: 'bitgo', index: 5, value: 100000 }];
  const unsigned = run('build', { network, xpubs, inputs }).psbt;
  expectSigned(network, xpubs, unsigned, ['-']);
  // sign skips MuSig2 key-path inputs, so a user key has nothing to sign
  const msg = run('sign', { network, psbt: unsigned, xprv: xprvs[0] }, { expectFail: true });
  assert.match(msg, /cannot sign any input/);
});

check('bad requests fail with one-line errors', () => {
  run('build', { network: 'bitcoinz', xpubs, inputs: [] }, { expectFail: true });
  run('build', { network: 'litecoin', xpubs, inputs: [{ scriptType: 'p2tr', signer: 'user', cosigner: 'bitgo', index: 0, value: 1000 }] }, { expectFail: true });
  run('verify', { network: 'testnet', xpubs, psbt: 'zz' }, { expectFail: true });
  run('nosuchcommand', {}, { expectFail: true });
  // Verifying with the wrong wallet's xpubs: the signature is by an unknown key.
  const other = run('keys', {}).xpubs;
  const psbt = run('build', { network: 'testnet', xpubs, inputs: [{ scriptType: 'p2wsh', signer: 'user', cosigner: 'bitgo', index: 0, value: 10000 }] }).psbt;
  const half = run('sign', { network: 'testnet', psbt, xprv: xprvs[0] }).psbt;
  run('verify', { network: 'testnet', xpubs: other, psbt: half }, { expectFail: true });
});

console.log(`all ${count} checks passed`);
