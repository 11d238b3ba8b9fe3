// dataloader_bench.js — graphql's `dataloader` doing the same work as
// loader_bench.c (see there for the scenarios). Not a dependency of flash:
// run.sh installs the package into bench/out/npm and passes its path in
// DATALOADER_PATH.
//
// usage: DATALOADER_PATH=<dir>/node_modules/dataloader node dataloader_bench.js [reps]
// prints "<scenario> <ns_per_load>" reps times per scenario after one
// warm-up, and one "check ..." line per scenario (compared with flash's).
//        ... node dataloader_bench.js --scale [reps]
// the scale sweep of loader_bench --scale: one request of n distinct loads
// (new DataLoader + n loads + Promise.all + await) for n = 10 .. 1,000,000,
// each sample repeated until it made at least 1M loads; prints
// "scale/<n> <ns_per_load>" and "check scale/<n> ..." like flash.
'use strict';

const DataLoader = require(process.env.DATALOADER_PATH || 'dataloader');

const N = 100000, DUP_UNIQUE = 50000, TICKS = 1000, PER_TICK = 100;
const scaleMode = process.argv[2] === '--scale';
const repArg = scaleMode ? process.argv[3] : process.argv[2];
const reps = repArg ? parseInt(repArg, 10) : 11;
if (!(reps >= 1)) {
  console.error('usage: dataloader_bench.js [reps] | --scale [reps]');
  process.exit(2);
}

const keys = new Array(N);
for (let i = 0; i < N; i++) keys[i] = 'k' + i;

// xorshift32 and Fisher-Yates, bit for bit as in loader_bench.c.
let rng = 2463534242 | 0;
function rngNext() {
  rng ^= rng << 13;
  rng ^= rng >>> 17;
  rng ^= rng << 5;
  return rng >>> 0;
}
const dupSeq = new Array(N);
for (let i = 0; i < N; i++) dupSeq[i] = i % DUP_UNIQUE;
for (let i = N - 1; i > 0; i--) {
  const j = rngNext() % (i + 1);
  const t = dupSeq[i];
  dupSeq[i] = dupSeq[j];
  dupSeq[j] = t;
}

let batchCalls = 0, batchKeys = 0;
// Every key resolves to itself.
const batchFn = (ks) => {
  batchCalls++;
  batchKeys += ks.length;
  return Promise.resolve(ks);
};

let results = null;

async function runDistinct() {
  const loader = new DataLoader(batchFn);
  const ps = new Array(N);
  for (let i = 0; i < N; i++) ps[i] = loader.load(keys[i]);
  results = await Promise.all(ps);
}

async function runDup50() {
  const loader = new DataLoader(batchFn);
  const ps = new Array(N);
  for (let i = 0; i < N; i++) ps[i] = loader.load(keys[dupSeq[i]]);
  results = await Promise.all(ps);
}

async function runTicks() {
  const loader = new DataLoader(batchFn);
  const out = new Array(TICKS);
  for (let t = 0; t < TICKS; t++) {
    const ps = new Array(PER_TICK);
    for (let j = 0; j < PER_TICK; j++) ps[j] = loader.load(keys[t * PER_TICK + j]);
    out[t] = await Promise.all(ps);
  }
  results = out; // flattened by checkResults, after the clock stopped
}

let memoLoader = null;
async function memoSetup() {
  memoLoader = new DataLoader(batchFn);
  const ps = new Array(N);
  for (let i = 0; i < N; i++) ps[i] = memoLoader.load(keys[i]);
  await Promise.all(ps);
}
async function runMemo() {
  const ps = new Array(N);
  for (let i = 0; i < N; i++) ps[i] = memoLoader.load(keys[i]);
  results = await Promise.all(ps);
}

const scenarios = [
  { name: 'distinct', setup: null, run: runDistinct, seq: null },
  { name: 'dup50', setup: null, run: runDup50, seq: dupSeq },
  { name: 'ticks', setup: null, run: runTicks, seq: null },
  { name: 'memo', setup: memoSetup, run: runMemo, seq: null },
];

// FNV-1a over the result strings, each followed by a 0 byte.
function checkResults(s) {
  let h = 2166136261 >>> 0;
  if (s.name === 'ticks' && results) results = [].concat(...results);
  if (!results || results.length !== N) throw new Error(s.name + ': wrong number of results');
  for (let i = 0; i < N; i++) {
    const k = s.seq ? s.seq[i] : i;
    const r = results[i];
    if (r !== keys[k]) throw new Error(s.name + ': result ' + i + ' is not key ' + keys[k]);
    for (let c = 0; c <= r.length; c++) {
      h ^= c < r.length ? r.charCodeAt(c) : 0;
      h = Math.imul(h, 16777619) >>> 0;
    }
  }
  return h;
}

function hex8(h) {
  return ('0000000' + h.toString(16)).slice(-8);
}

// ---- the scale sweep ------------------------------------------------------
const SCALE_SIZES = [10, 100, 1000, 10000, 100000, 1000000], SCALE_MIN_LOADS = 1000000;

async function scaleRequest(skeys, n) {
  const loader = new DataLoader(batchFn);
  const ps = new Array(n);
  for (let i = 0; i < n; i++) ps[i] = loader.load(skeys[i]);
  return Promise.all(ps);
}

async function runScale(version) {
  const max = SCALE_SIZES[SCALE_SIZES.length - 1];
  const skeys = new Array(max);
  for (let i = 0; i < max; i++) skeys[i] = 'k' + i;
  console.log(`# dataloader ${version} node ${process.version} scale min_loads_per_sample=${SCALE_MIN_LOADS} reps=${reps}`);
  for (const n of SCALE_SIZES) {
    const per = Math.ceil(SCALE_MIN_LOADS / n);
    let res = null, calls = 0, bkeys = 0;
    for (let r = -1; r < reps; r++) { // r === -1: warm-up, not printed
      batchCalls = batchKeys = 0;
      const t0 = process.hrtime.bigint();
      for (let k = 0; k < per; k++) res = await scaleRequest(skeys, n);
      const t1 = process.hrtime.bigint();
      calls = batchCalls / per;
      bkeys = batchKeys / per;
      if (r >= 0) console.log(`scale/${n} ${(Number(t1 - t0) / (per * n)).toFixed(2)}`);
    }
    let h = 2166136261 >>> 0;
    for (let i = 0; i < n; i++) {
      const r = res[i];
      if (r !== skeys[i]) throw new Error('scale/' + n + ': result ' + i + ' is not key ' + skeys[i]);
      for (let c = 0; c <= r.length; c++) {
        h ^= c < r.length ? r.charCodeAt(c) : 0;
        h = Math.imul(h, 16777619) >>> 0;
      }
    }
    console.log(`check scale/${n} loads=${n} batches=${calls} batch_keys=${bkeys} hash=${hex8(h)}`);
  }
}

async function main() {
  let version = '?';
  try {
    version = require(require('path').join(process.env.DATALOADER_PATH || 'dataloader', 'package.json')).version;
  } catch (e) { /* only informative */ }
  if (scaleMode) return runScale(version);
  console.log(`# dataloader ${version} node ${process.version} loads_per_scenario=${N} reps=${reps}`);
  for (const s of scenarios) {
    let calls = 0, bkeys = 0, h = 0;
    for (let r = -1; r < reps; r++) { // r === -1: warm-up, not printed
      if (s.setup) await s.setup();
      batchCalls = batchKeys = 0;
      results = null;
      const t0 = process.hrtime.bigint();
      await s.run();
      const t1 = process.hrtime.bigint();
      calls = batchCalls;
      bkeys = batchKeys;
      h = checkResults(s);
      if (r >= 0) console.log(`${s.name} ${(Number(t1 - t0) / N).toFixed(2)}`);
    }
    console.log(`check ${s.name} loads=${N} batches=${calls} batch_keys=${bkeys} hash=${hex8(h)}`);
  }
}

main().catch((e) => {
  console.error('dataloader_bench: ' + (e && e.stack ? e.stack : e));
  process.exit(1);
});
