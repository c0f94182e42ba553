#!/usr/bin/env node
// Interop helper for kmsq tests: BitGo's own ETH-like wallet operation hashes.
//
//   node tests/interop/eth.js prefixes < {coins: [...]}     -> {prefixes: {coin: prefix | null}}
//   node tests/interop/eth.js hash < {coin, to, value, data, expireTime, sequenceId} -> {operationHash}
//     (value, expireTime and sequenceId as decimal strings: JSON numbers stop at 2^53)
//
// prefixes: @bitgo/statics' nativeCoinOperationHashPrefix of each coin's network.
// hash: soliditySHA3 of the operation as @bitgo/abstract-eth's getOperation lays it out:
//   ['string', 'address', 'uint', 'bytes', 'uint', 'uint'] of
//   [prefix, to, value, data, expireTime, sequenceId].
// Reads one JSON object from stdin, writes one to stdout; on error, a line on stderr and exit status 1.
'use strict';

const { coins } = require('@bitgo/statics');
const abi = require('ethereumjs-abi');
const BN = require('bn.js');

function read() {
  return JSON.parse(require('fs').readFileSync(0, 'utf8'));
}

function prefixOf(coin) {
  return coins.get(coin).network.nativeCoinOperationHashPrefix ?? null;
}

function main() {
  const command = process.argv[2];
  const req = read();
  if (command === 'prefixes') {
    const prefixes = {};
    for (const coin of req.coins) prefixes[coin] = prefixOf(coin);
    return { prefixes };
  }
  if (command === 'hash') {
    const prefix = prefixOf(req.coin);
    if (prefix === null) throw new Error(`no operation hash prefix for ${req.coin}`);
    const data = Buffer.from(req.data.replace(/^0x/, ''), 'hex');
    const hash = abi.soliditySHA3(
      ['string', 'address', 'uint', 'bytes', 'uint', 'uint'],
      [prefix, new BN(req.to.replace(/^0x/, ''), 16), new BN(req.value, 10), data, new BN(req.expireTime, 10),
       new BN(req.sequenceId, 10)],
    );
    return { operationHash: '0x' + hash.toString('hex') };
  }
  throw new Error(`unknown command ${JSON.stringify(command)} (prefixes, hash)`);
}

try {
  process.stdout.write(JSON.stringify(main()) + '\n');
} catch (e) {
  process.stderr.write(`${e.message}\n`);
  process.exit(1);
}
