'use strict';
// Retries of unary calls, against a real server, through relays that lose a reply or are not
// there yet; a grpc-js interceptor counts the attempts.
const assert = require('node:assert/strict');
const net = require('node:net');
const { randomUUID } = require('node:crypto');
const { after, before, test } = require('node:test');
const { SessionClient, ChatSessionError, status } = require('../src');
const { Backoff } = require('../src/retry');
const { attemptCounter, freePort, liveServer, newUser, relay, user } = require('./support');

// grpc-js waits 1 s (then longer) before reconnecting after a refused connection: shorter here.
const FAST_RECONNECT = { 'grpc.initial_reconnect_backoff_ms': 20, 'grpc.max_reconnect_backoff_ms': 50 };

let server;
let client;

before(async () => {
  server = await liveServer();
  client = new SessionClient(server.address);
});

after(async () => {
  client?.close();
  await server?.stop();
});


/** A client of `address` whose attempts `counter` counts. */
function countedClient(address, counter, options = {}) {
  return new SessionClient(address, { ...options, channelOptions: { ...FAST_RECONNECT, interceptors: [counter.interceptor] } });
}

/** The rejection of `promise`, which must be a ChatSessionError. */
async function failure(promise) {
  const error = await promise.then(
    () => assert.fail('the call succeeded'),
    (e) => e,
  );
  assert.ok(error instanceof ChatSessionError, `not a ChatSessionError: ${error}`);
  return error;
}

test('the RPCs with a request_id get one filled; reads and those are retried, other writes not', () => {
  const expected = {
    getSession: { requestIdField: false, retryable: true },
    listMessages: { requestIdField: false, retryable: true },
    getContext: { requestIdField: false, retryable: true },
    appendMessages: { requestIdField: true, retryable: true },
    createSession: { requestIdField: true, retryable: true },
    forkSession: { requestIdField: true, retryable: true },
    compactMessages: { requestIdField: true, retryable: true },
    clearMessages: { requestIdField: true, retryable: true },
    updateSession: { requestIdField: false, retryable: false },
    deleteSession: { requestIdField: false, retryable: false },
  };
  for (const [name, rpc] of Object.entries(expected)) assert.deepEqual(client.unaryRpcs.get(name), rpc, name);
});

test('an append without requestId whose reply is lost is retried with the same id: replayed, stored once', async () => {
  const link = await relay(server.address);
  const writer = new SessionClient(link.address);
  try {
    const { session } = await writer.createSession({ userId: newUser() });
    const sessionId = session.sessionId;
    const request = { sessionId, messages: [user('once')] };
    link.dropNextReply(); // the server appends; the client never hears so
    const appended = await writer.appendMessages(request);
    assert.ok(link.replyDropped());
    assert.equal(appended.replayed, true);
    assert.deepEqual(appended.messages.map((m) => [m.seq, m.content]), [[1, 'once']]);
    assert.equal(request.requestId, undefined); // the caller's request is left as it was
    const page = await client.listMessages({ sessionId });
    assert.deepEqual(page.messages.map((m) => m.content), ['once']);

    // A caller's own id is the one sent: the server knows it afterwards.
    link.dropNextReply();
    const mine = await writer.appendMessages({ sessionId, requestId: 'turn-2', messages: [user('mine')] });
    assert.equal(mine.replayed, true);
    const again = await client.appendMessages({ sessionId, requestId: 'turn-2', messages: [user('mine')] }, { retry: false });
    assert.equal(again.replayed, true);
    assert.deepEqual((await client.listMessages({ sessionId })).messages.map((m) => m.content), ['once', 'mine']);
  } finally {
    writer.close();
    await link.close();
  }
});

test('a call to an address where nothing listens yet succeeds once the server is there', async () => {
  const port = await freePort();
  const attempts = attemptCounter();
  const early = countedClient(`127.0.0.1:${port}`, attempts);
  let link;
  try {
    const userId = newUser();
    const created = early.createSession({ userId });
    await attempts.reached(2); // refused, and retried
    link = await relay(server.address, { port });
    const { session } = await created;
    assert.equal(session.userId, userId);
    // Created once, whichever attempt got through.
    assert.deepEqual((await client.listSessions({ userId })).sessions.map((s) => s.sessionId), [session.sessionId]);
  } finally {
    early.close();
    await link?.close();
  }
});

test('retry: false makes one attempt, for the client or for one call', async () => {
  const address = `127.0.0.1:${await freePort()}`;
  const attempts = attemptCounter();
  const retrying = countedClient(address, attempts);
  const single = countedClient(address, attempts, { retry: false });
  try {
    const retried = await failure(retrying.getSession({ sessionId: 's' }, { retry: { maxAttempts: 3 } }));
    assert.equal(retried.code, status.UNAVAILABLE);
    assert.equal(attempts.count('GetSession'), 3);

    attempts.reset();
    assert.equal((await failure(retrying.getSession({ sessionId: 's' }, { retry: false }))).code, status.UNAVAILABLE);
    assert.equal((await failure(single.getSession({ sessionId: 's' }))).code, status.UNAVAILABLE);
    assert.equal(attempts.count('GetSession'), 2);

    attempts.reset(); // a call's policy over the client's false
    await failure(single.getSession({ sessionId: 's' }, { retry: { maxAttempts: 2 } }));
    assert.equal(attempts.count('GetSession'), 2);
  } finally {
    retrying.close();
    single.close();
  }
});

test('only UNAVAILABLE and DEADLINE_EXCEEDED are retried, and only calls safe to repeat', async () => {
  const attempts = attemptCounter();
  const live = countedClient(server.address, attempts, { retry: { maxAttempts: 3 } });
  const away = countedClient(`127.0.0.1:${await freePort()}`, attempts, { retry: { maxAttempts: 3 } });
  try {
    // Nothing listens: UNAVAILABLE. Retried for a read and for a write with a request_id ...
    await failure(away.listMessages({ sessionId: 's' }));
    await failure(away.appendMessages({ sessionId: 's', messages: [user('hi')] }));
    assert.equal(attempts.count('ListMessages'), 3);
    assert.equal(attempts.count('AppendMessages'), 3);
    // ... not for a write without one, which might have been applied.
    await failure(away.updateSession({ session: { sessionId: 's', title: 't' }, updateMask: { paths: ['title'] } }));
    await failure(away.deleteSession({ sessionId: 's' }));
    assert.equal(attempts.count('UpdateSession'), 1);
    assert.equal(attempts.count('DeleteSession'), 1);

    // The server's answers about the request itself are final.
    attempts.reset();
    assert.equal((await failure(live.getSession({ sessionId: `missing-${randomUUID()}` }))).code, status.NOT_FOUND);
    const { session } = await live.createSession({ userId: newUser() });
    const invalid = await failure(live.appendMessages({ sessionId: session.sessionId, messages: [user('')] }));
    assert.equal(invalid.code, status.INVALID_ARGUMENT);
    const stale = await failure(live.appendMessages({ sessionId: session.sessionId, expectedLastSeq: 5, messages: [user('hi')] }));
    assert.equal(stale.code, status.FAILED_PRECONDITION);
    assert.equal(attempts.count('GetSession'), 1);
    assert.equal(attempts.count('AppendMessages'), 2);
  } finally {
    live.close();
    away.close();
  }
});

test('DEADLINE_EXCEEDED is retried: timeoutMs bounds each attempt, deadlineMs all of them', async () => {
  // A peer that accepts connections and never answers: every attempt runs out of time.
  const sockets = new Set();
  const silent = net.createServer((socket) => sockets.add(socket)).listen(0, '127.0.0.1');
  await new Promise((resolve) => silent.once('listening', resolve));
  const attempts = attemptCounter();
  const stuck = countedClient(`127.0.0.1:${silent.address().port}`, attempts);
  try {
    const error = await failure(stuck.getSession({ sessionId: 's' }, { timeoutMs: 50, retry: { maxAttempts: 3 } }));
    assert.equal(error.code, status.DEADLINE_EXCEEDED);
    assert.equal(attempts.count('GetSession'), 3);

    // Without timeoutMs an attempt ends with the overall deadline (without one it would wait on).
    const late = await failure(stuck.getSession({ sessionId: 's' }, { retry: { deadlineMs: 200 } }));
    assert.equal(late.code, status.DEADLINE_EXCEEDED);
  } finally {
    stuck.close();
    sockets.forEach((s) => s.destroy());
    silent.close();
  }
});

test('backoff: full jitter under a doubling cap, never shorter than RetryInfo, within attempts and deadline', () => {
  const unavailable = { code: status.UNAVAILABLE };
  const backoff = new Backoff({ maxAttempts: 4, initialBackoffMs: 100, maxBackoffMs: 150, deadlineMs: 60_000 });
  const first = backoff.nextDelayMs(unavailable);
  assert.ok(first !== undefined && first >= 0 && first < 100, String(first));
  assert.ok(backoff.nextDelayMs(unavailable) < 150); // doubled, then capped
  assert.ok(backoff.nextDelayMs({ code: status.UNAVAILABLE, retryDelayMs: 400 }) >= 400);
  assert.equal(backoff.nextDelayMs(unavailable), undefined); // 4 attempts made
  backoff.restart();
  assert.notEqual(backoff.nextDelayMs(unavailable), undefined);

  const fresh = new Backoff({ maxAttempts: Infinity, initialBackoffMs: 100, maxBackoffMs: 100, deadlineMs: 60_000 });
  for (const code of [status.NOT_FOUND, status.INVALID_ARGUMENT, status.FAILED_PRECONDITION, status.RESOURCE_EXHAUSTED, status.ABORTED]) {
    assert.equal(fresh.nextDelayMs({ code, retryDelayMs: 10 }), undefined, String(code));
  }
  assert.notEqual(fresh.nextDelayMs({ code: status.DEADLINE_EXCEEDED }), undefined);
  // A RetryInfo delay past the deadline: give up now rather than fail later.
  assert.equal(fresh.nextDelayMs({ code: status.UNAVAILABLE, retryDelayMs: 120_000 }), undefined);
});
