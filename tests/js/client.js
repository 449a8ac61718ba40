// Drives the official AMPS JavaScript client (npm `amps`) against the ampsflow devbroker.
// Usage: node client.js SCENARIO WS_URI [ARGS...]; prints one JSON line with what it saw
// and exits 0, or prints {"error": ...} and exits 1. Driven by
// tests/integration/devbroker/test_js_client.py.
'use strict';

const { Client, Command } = require('amps');

const TIMEOUT_MS = 15000;

function waitFor(predicate, what) {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const poll = () => {
      if (predicate()) return resolve();
      if (Date.now() - started > TIMEOUT_MS) return reject(new Error(`timed out waiting for ${what}`));
      setTimeout(poll, 10);
    };
    poll();
  });
}

function describe(message) {
  return {
    data: message.data,
    correlationId: message.header.correlationId() || null,
    bookmark: message.header.bookmark() || null,
    subIds: message.header.subIds() || null,
    topic: message.header.topic() || null,
  };
}

// The client rejects with an Error(reason), or with {commandId, message: <the ack>} when
// the logon itself is refused.
function reason(err) {
  if (err instanceof Error) return err.message;
  if (err && typeof err === 'object') {
    if (err.reason) return err.reason;
    if (err.message && err.message.reason) return err.message.reason;
  }
  return String(err);
}

// Subscribe to IN_TOPIC (with a filter), publish BODY to OUT_TOPIC with correlation id
// CORR, then wait for the first message on IN_TOPIC.
async function roundtrip(uri, inTopic, filter, outTopic, corr, body) {
  const client = new Client('js-roundtrip');
  await client.connect(uri);
  const received = [];
  await client.subscribe((m) => received.push(describe(m)), inTopic, filter);
  client.publish(outTopic, JSON.parse(body), { correlationId: corr });
  await waitFor(() => received.length > 0, `a message on ${inTopic}`);
  await client.disconnect();
  return { received };
}

// Log on (credentials, if any, in the URI) and report the server version.
async function logon(uri) {
  const client = new Client('js-logon');
  await client.connect(uri);
  const version = client.serverVersion();
  await client.disconnect();
  return { version };
}

// Publish COUNT messages {"n": i} to TOPIC and wait for the broker to persist them.
async function publish(uri, topic, count) {
  const client = new Client('js-publisher').heartbeat(1);
  await client.connect(uri);
  for (let i = 1; i <= Number(count); i += 1) client.publish(topic, { n: i });
  await client.flush('persisted');
  await client.disconnect();
  return { published: Number(count) };
}

// Publish COUNT messages through a memory publish store (a=persisted with s) and wait
// until the broker's persisted acks have emptied the store.
async function stored(uri, topic, count) {
  const client = Client.createMemoryBacked('js-stored');
  await client.connect(uri);
  for (let i = 1; i <= Number(count); i += 1) client.publish(topic, { n: i });
  await waitFor(() => client.publishStore().unpersistedCount() === 0, 'persisted acks');
  await client.disconnect();
  return { unpersisted: client.publishStore().unpersistedCount() };
}

// Replay TOPIC from BOOKMARK until COUNT messages arrived.
async function replay(uri, topic, bookmark, count) {
  const client = new Client('js-replay');
  await client.connect(uri);
  const received = [];
  await client.subscribe((m) => received.push(describe(m)), topic, undefined, { bookmark });
  await waitFor(() => received.length >= Number(count), `${count} replayed messages`);
  await client.disconnect();
  return { received };
}

// Replay TOPIC from BOOKMARK until COUNT messages arrived; report only each body's size
// and `n` (large replays would not fit on stdout).
async function replaysizes(uri, topic, bookmark, count) {
  const client = new Client('js-replay-sizes');
  await client.connect(uri);
  const received = [];
  await client.subscribe(
    (m) => received.push({ n: m.data.n, size: JSON.stringify(m.data).length }),
    topic,
    undefined,
    { bookmark },
  );
  await waitFor(() => received.length >= Number(count), `${count} replayed messages`);
  await client.disconnect();
  return { received };
}

// Subscribe with FILTER and report how the broker refused it.
async function refuse(uri, topic, filter) {
  const client = new Client('js-refused');
  await client.connect(uri);
  try {
    await client.execute(new Command('subscribe').topic(topic).filter(filter), () => {});
    return { refused: null };
  } catch (err) {
    return { refused: reason(err) };
  } finally {
    await client.disconnect();
  }
}

// Subscribe to the queue QUEUE with max_backlog BACKLOG, acknowledge every message with
// client.ack() in batches of BATCH, until COUNT messages arrived; disconnect (which sends
// any batch still pending).
async function queue(uri, queueTopic, count, backlog, batch) {
  const client = new Client('js-queue');
  await client.connect(uri);
  client.ackBatchSize(Number(batch));
  const received = [];
  await client.subscribe(
    (m) => {
      received.push({ ...describe(m), leasePeriod: m.header.leasePeriod() || null });
      client.ack(m);
    },
    queueTopic,
    undefined,
    { options: `max_backlog=${backlog}` },
  );
  await waitFor(() => received.length >= Number(count), `${count} queue messages`);
  await client.disconnect();
  return { received };
}

const scenarios = { logon, roundtrip, publish, stored, replay, replaysizes, refuse, queue };

async function main() {
  const [scenario, ...args] = process.argv.slice(2);
  const run = scenarios[scenario];
  if (!run) throw new Error(`unknown scenario ${scenario}`);
  const result = await run(...args);
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

main().then(
  () => process.exit(0),
  (err) => {
    process.stdout.write(`${JSON.stringify({ error: reason(err) })}\n`);
    process.exit(1);
  },
);
