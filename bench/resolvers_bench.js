// resolvers_bench.js — the resolver scenario of tasks_bench.c with async
// functions and graphql's `dataloader` on node: 1,000 async resolvers, each
// doing 3 sequential `await loader.load(key)`; a whole request per
// repetition (new DataLoader + 1,000 calls + Promise.all), the batch
// function resolving every key to itself (3 batches of 1,000 keys).
// Not a dependency of flash: run.sh installs the package into bench/out/npm
// and passes its path in DATALOADER_PATH.
//
// usage: DATALOADER_PATH=<dir>/node_modules/dataloader node resolvers_bench.js [reps]
// prints "resolvers <ns_per_load>" reps times after 20 warm-ups and one
// "check resolvers ..." line (compared with tasks_bench's).
'use strict';

const DataLoader = require(process.env.DATALOADER_PATH || 'dataloader');

const TASKS = 1000, LOADS = 3, N = TASKS * LOADS, WARMUP = 20;
const reps = process.argv[2] ? parseInt(process.argv[2], 10) : 11;
if (!(reps >= 1)) {
  console.error('usage: resolvers_bench.js [reps]');
  process.exit(2);
}

const keys = new Array(N);
for (let j = 0; j < N; j++) keys[j] = 'k' + j;
const results = new Array(N);

let batchCalls = 0, batchKeys = 0;
const batchFn = (ks) => {
  batchCalls++;
  batchKeys += ks.length;
  return Promise.resolve(ks);
};

async function resolver(loader, i) {
  for (let k = 0; k < LOADS; k++) {
    const j = i * LOADS + k;
    results[j] = await loader.load(keys[j]);
  }
}

async function request() {
  const loader = new DataLoader(batchFn);
  const ps = new Array(TASKS);
  for (let i = 0; i < TASKS; i++) ps[i] = resolver(loader, i);
  await Promise.all(ps);
}

// FNV-1a over the results, each followed by a 0 byte (as tasks_bench.c).
function checkHash() {
  let h = 2166136261 >>> 0;
  for (let j = 0; j < N; j++) {
    const r = results[j];
    if (r !== keys[j]) throw new Error('result ' + j + ' is not its key');
    for (let c = 0; c <= r.length; c++) {
      h ^= c < r.length ? r.charCodeAt(c) : 0;
      h = Math.imul(h, 16777619) >>> 0;
    }
  }
  return h;
}

async function main() {
  let version = '?';
  try {
    version = require(require('path').join(process.env.DATALOADER_PATH || 'dataloader', 'package.json')).version;
  } catch (e) { /* only informative */ }
  console.log(`# dataloader ${version} node ${process.version} resolvers=${TASKS}x${LOADS} reps=${reps}`);
  let h = 0, calls = 0, bkeys = 0;
  for (let r = -WARMUP; r < reps; r++) { // r < 0: warm-up (the JIT), not printed
    results.fill(undefined);
    batchCalls = batchKeys = 0;
    const t0 = process.hrtime.bigint();
    await request();
    const t1 = process.hrtime.bigint();
    calls = batchCalls;
    bkeys = batchKeys;
    h = checkHash();
    if (r >= 0) console.log(`resolvers ${(Number(t1 - t0) / N).toFixed(2)}`);
  }
  console.log(`check resolvers loads=${N} batches=${calls} batch_keys=${bkeys} hash=${('0000000' + h.toString(16)).slice(-8)}`);
}

main().catch((e) => {
  console.error('resolvers_bench: ' + (e && e.stack ? e.stack : e));
  process.exit(1);
});
