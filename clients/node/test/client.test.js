'use strict';
const assert = require('node:assert/strict');
const { randomUUID } = require('node:crypto');
const { after, before, test } = require('node:test');
const { SessionClient, ChatSessionError, status } = require('../src');
const { liveServer, newUser, relay, user } = require('./support');

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


/** The rejection of `promise`, which must be a ChatSessionError. */
async function failure(promise) {
  const error = await promise.then(
    () => assert.fail('the call succeeded'),
    (e) => e,
  );
  assert.ok(error instanceof ChatSessionError, `not a ChatSessionError: ${error}`);
  return error;
}

test('every unary RPC of the service is a method', () => {
  const unary = Object.values(client.methods).filter((m) => !m.requestStream && !m.responseStream);
  assert.ok(unary.length >= 7);
  for (const method of unary) assert.equal(typeof client[method.originalName], 'function', method.originalName);
});

test('create, append, list, get, list sessions, delete', async () => {
  const userId = newUser();
  const { session } = await client.createSession({ userId, title: 'Trip to Oslo', labels: { team: 'travel' } });
  assert.equal(session.userId, userId);
  assert.deepEqual(session.labels, { team: 'travel' });

  const appended = await client.appendMessages({
    sessionId: session.sessionId,
    requestId: 'turn-1',
    messages: [{ role: 'ROLE_SYSTEM', content: 'You are a travel agent.', tokens: 6 }, user('Hotels?', 3)],
  });
  assert.deepEqual(appended.messages.map((m) => m.seq), [1, 2]);
  assert.equal(appended.session.tokenCount, 9);
  assert.equal(appended.replayed, false);

  const page = await client.listMessages({ sessionId: session.sessionId, afterSeq: 1 });
  assert.deepEqual(page.messages.map((m) => [m.seq, m.role, m.content]), [[2, 'ROLE_USER', 'Hotels?']]);
  assert.equal(page.lastSeq, 2);

  const { session: got } = await client.getSession({ sessionId: session.sessionId }, { timeoutMs: 5000 });
  assert.equal(got.messageCount, 2);
  assert.equal(got.title, 'Trip to Oslo');

  const listed = await client.listSessions({ userId });
  assert.deepEqual(listed.sessions.map((s) => s.sessionId), [session.sessionId]);

  await client.deleteSession({ sessionId: session.sessionId });
  assert.equal((await failure(client.getSession({ sessionId: session.sessionId }))).code, status.NOT_FOUND);
});

test('INVALID_ARGUMENT comes with the BadRequest field violations decoded', async () => {
  const { session } = await client.createSession({ userId: newUser() });
  const error = await failure(client.appendMessages({ sessionId: session.sessionId, messages: [user('')] }));
  assert.equal(error.code, status.INVALID_ARGUMENT);
  assert.equal(error.codeName, 'INVALID_ARGUMENT');
  assert.deepEqual(error.fieldViolations.map((v) => v.field), ['messages[0].content']);
  assert.match(error.fieldViolations[0].description, /must not be empty/);
  assert.equal(error.details[0].type, 'google.rpc.BadRequest');
  // ... and nothing was written.
  assert.equal((await client.getSession({ sessionId: session.sessionId })).session.messageCount, 0);
});

test('NOT_FOUND comes with the ResourceInfo of the session', async () => {
  const sessionId = `missing-${randomUUID()}`;
  const error = await failure(client.getSession({ sessionId }));
  assert.equal(error.code, status.NOT_FOUND);
  assert.equal(error.resourceInfo.resourceName, sessionId);
  assert.equal(error.resourceInfo.resourceType, 'chatsession.v1.Session');
  assert.equal(error.badRequest, undefined);
  assert.deepEqual(error.fieldViolations, []);
});

test('FAILED_PRECONDITION comes with the PreconditionFailure decoded', async () => {
  const { session } = await client.createSession({ userId: newUser() });
  const error = await failure(
    client.appendMessages({ sessionId: session.sessionId, expectedLastSeq: 5, messages: [user('hi')] }),
  );
  assert.equal(error.code, status.FAILED_PRECONDITION);
  assert.deepEqual(error.preconditionFailure.violations, [
    { type: 'LAST_SEQ_MISMATCH', subject: 'expected_last_seq', description: "the session's last seq is 0, not 5" },
  ]);
});

test('watch delivers stored then new messages, resumes after a dropped connection, ends on delete', async () => {
  const { session } = await client.createSession({ userId: newUser() });
  const sessionId = session.sessionId;
  await client.appendMessages({ sessionId, messages: [user('one'), user('two')] });
  const link = await relay(server.address);
  const watcher = new SessionClient(link.address);
  try {
    const events = watcher.watch(sessionId, { afterSeq: 0, initialBackoffMs: 20 });
    const seqs = [];
    const next = async () => {
      const { value } = await events.next();
      assert.equal(value.event, 'message');
      seqs.push(value.message.seq);
      return value.message;
    };
    await next();
    await next();
    await client.appendMessages({ sessionId, messages: [user('three')] });
    assert.equal((await next()).content, 'three');

    link.cut(); // the stream breaks with UNAVAILABLE; the watch reconnects after seq 3
    await client.appendMessages({ sessionId, messages: [user('four'), user('five')] });
    await next();
    await next();
    assert.deepEqual(seqs, [1, 2, 3, 4, 5]);

    await client.deleteSession({ sessionId });
    const ended = await failure(events.next());
    assert.equal(ended.code, status.NOT_FOUND);
  } finally {
    watcher.close();
    await link.close();
  }
});

test('watch without afterSeq delivers only new messages; leaving the loop cancels it', async () => {
  const { session } = await client.createSession({ userId: newUser() });
  const sessionId = session.sessionId;
  await client.appendMessages({ sessionId, messages: [user('old')] });
  const events = client.watch(sessionId, { includeHeartbeats: true });
  const first = (await events.next()).value;
  assert.equal(first.event, 'heartbeat');
  assert.equal(first.heartbeat.lastSeq, 1);
  await client.appendMessages({ sessionId, messages: [user('new')] });
  for await (const event of events) {
    if (event.event !== 'message') continue;
    assert.equal(event.message.content, 'new');
    break;
  }
  assert.deepEqual(await events.next(), { value: undefined, done: true });
});

test('getContext and forkSession are methods of the client', async () => {
  const userId = newUser();
  const { session } = await client.createSession({ userId });
  const sessionId = session.sessionId;
  await client.appendMessages({
    sessionId,
    messages: [{ role: 'ROLE_SYSTEM', content: 'Be brief.', tokens: 2 }, user('Hotels?', 3), user('In Oslo.', 4)],
  });
  const context = await client.getContext({ sessionId, maxTokens: 6 });
  assert.deepEqual(context.messages.map((m) => m.seq), [1, 3]); // the pinned prompt, then what fits
  assert.equal(context.tokens, 6);
  assert.equal(context.truncated, true);

  const forkId = `${sessionId}-fork`;
  const forked = await client.forkSession({ sessionId, atSeq: 2, newSessionId: forkId });
  assert.equal(forked.session.sessionId, forkId);
  assert.equal(forked.session.messageCount, 2);
  assert.equal(forked.session.labels.forked_from, sessionId); // map keys are kept as stored
  const copied = await client.listMessages({ sessionId: forkId });
  assert.deepEqual(copied.messages.map((m) => m.content), ['Be brief.', 'Hotels?']);
});

test('a refused CompactMessages comes with its PreconditionFailure decoded', async () => {
  const { session } = await client.createSession({ userId: newUser() });
  await client.appendMessages({ sessionId: session.sessionId, messages: [user('one'), user('two')] });
  const error = await failure(
    client.compactMessages({
      sessionId: session.sessionId,
      upToSeq: 9,
      summary: { role: 'ROLE_SYSTEM', content: 'Summary.', tokens: 1 },
    }),
  );
  assert.equal(error.code, status.FAILED_PRECONDITION);
  assert.deepEqual(error.preconditionFailure.violations, [
    { type: 'UP_TO_SEQ_AHEAD', subject: 'up_to_seq', description: "up_to_seq 9 is beyond the session's last seq 2" },
  ]);
  // ... and nothing was compacted.
  const page = await client.listMessages({ sessionId: session.sessionId });
  assert.deepEqual(page.messages.map((m) => m.content), ['one', 'two']);
});

test('truncateMessages removes the tail, popMessage the newest; seqs go on after the last', async () => {
  const { session } = await client.createSession({ userId: newUser() });
  const sessionId = session.sessionId;
  await client.appendMessages({ sessionId, messages: [user('one'), user('two'), user('three'), user('four')] });
  const cut = await client.truncateMessages({ sessionId, afterSeq: 2, returnRemoved: true, expectedLastSeq: 4 });
  assert.deepEqual(cut.removedMessages.map((m) => m.seq), [3, 4]);
  assert.equal(cut.removedCount, 2);
  assert.equal(cut.session.messageCount, 4); // seqs are never reused
  assert.equal((await client.popMessage(sessionId)).content, 'two');
  const appended = await client.appendMessages({ sessionId, messages: [user('five')] });
  assert.equal(appended.messages[0].seq, 5);
  const page = await client.listMessages({ sessionId, afterSeq: 0 });
  assert.deepEqual(page.messages.map((m) => m.seq), [1, 5]);

  const everything = await client.truncateMessages({ sessionId, afterSeq: 0 }); // 0 is sent, not dropped
  assert.equal(everything.removedCount, 2);
  assert.equal(await client.popMessage(sessionId), null);

  const error = await failure(client.truncateMessages({ sessionId, afterSeq: 9 }));
  assert.equal(error.code, status.FAILED_PRECONDITION);
  assert.deepEqual(error.preconditionFailure.violations, [
    { type: 'AFTER_SEQ_AHEAD', subject: 'after_seq', description: "after_seq 9 is beyond the session's last seq 5" },
  ]);
  const missing = await failure(client.truncateMessages({ sessionId }));
  assert.equal(missing.code, status.INVALID_ARGUMENT);
  assert.deepEqual(missing.badRequest.fieldViolations.map((v) => v.field), ['after_seq']);
});

test('a watch is told of a truncation once and goes on after its last seq', async () => {
  const { session } = await client.createSession({ userId: newUser() });
  const sessionId = session.sessionId;
  await client.appendMessages({ sessionId, messages: [user('one'), user('two'), user('three')] });
  const events = client.watch(sessionId, { includeHeartbeats: true });
  assert.equal((await events.next()).value.event, 'heartbeat');
  await client.truncateMessages({ sessionId, afterSeq: 1 });
  await client.appendMessages({ sessionId, messages: [user('four')] });
  const seen = [];
  for await (const event of events) {
    if (event.event === 'heartbeat') continue;
    seen.push(event.event === 'truncated' ? ['truncated', event.truncated.afterSeq, event.truncated.lastSeq] : ['message', event.message.seq]);
    if (event.event === 'message') break;
  }
  assert.deepEqual(seen, [['truncated', 1, 3], ['message', 4]]);
});

test('a payload is a plain JS value in and out, exact through append, replay, list, context, fork and watch', async () => {
  const payloads = [
    0.1 + 0.2,
    2 ** 53,
    -0,
    'unicode é 🎉 " \\ \n \u0000',
    { nested: [[{ a: [1, { b: null }] }], []], t: true, f: false, '': 'empty key', empty: {} },
    [],
    {},
    null,
    false,
    { at: new Date(0), skipped: undefined },
  ];
  const expected = payloads.slice(0, -1).concat([{ at: '1970-01-01T00:00:00.000Z' }]);
  const { session } = await client.createSession({ userId: newUser() });
  const sessionId = session.sessionId;
  const messages = payloads.map((payload, i) => ({ ...user(`m${i}`, 1), payload }));
  const check = (/** @type {any[]} */ got) => {
    assert.equal(got.length, expected.length);
    got.forEach((m, i) => assert.deepStrictEqual(m.payload, expected[i], `message ${i}`));
    assert.ok(Object.is(got[2].payload, -0), '-0 keeps its sign');
  };
  const appended = await client.appendMessages({ sessionId, requestId: 'p-1', messages: [...messages, user('plain', 1)] });
  check(appended.messages.slice(0, -1));
  assert.equal(appended.messages.at(-1).payload, undefined);
  const replay = await client.appendMessages({ sessionId, requestId: 'p-1', messages: [...messages, user('plain', 1)] });
  assert.equal(replay.replayed, true);
  check(replay.messages.slice(0, -1));
  check((await client.listMessages({ sessionId, pageSize: 100 })).messages.slice(0, -1));
  check((await client.getContext({ sessionId })).messages.slice(0, -1));
  const { session: fork } = await client.forkSession({ sessionId });
  check((await client.listMessages({ sessionId: fork.sessionId, pageSize: 100 })).messages.slice(0, -1));
  const watched = [];
  for await (const event of client.watch(sessionId, { afterSeq: 0 })) {
    watched.push(event.message);
    if (watched.length === messages.length) break;
  }
  check(watched);
});

test('a payload JSON cannot hold is refused before the call; too deep is INVALID_ARGUMENT naming it', async () => {
  const { session } = await client.createSession({ userId: newUser() });
  for (const bad of [NaN, Infinity, 10n, () => 1]) {
    await assert.rejects(client.appendMessages({ sessionId: session.sessionId, messages: [{ ...user('x', 1), payload: bad }] }), TypeError);
  }
  let deep = 1;
  for (let i = 0; i < 25; i++) deep = [deep];
  const error = await failure(client.appendMessages({ sessionId: session.sessionId, messages: [{ ...user('x', 1), payload: deep }] }));
  assert.equal(error.code, status.INVALID_ARGUMENT);
  assert.deepEqual(error.fieldViolations.map((v) => v.field), ['messages[0].payload']);
  assert.equal((await client.getSession({ sessionId: session.sessionId })).session.messageCount, 0);
});

test('a message keeps its own createdAt, and the session last_active follows it', async () => {
  const { session } = await client.createSession({ userId: newUser() });
  const createdAt = { seconds: 86_400, nanos: 123_456_000 };
  const appended = await client.appendMessages({ sessionId: session.sessionId, messages: [{ ...user('old', 1), createdAt }] });
  assert.deepEqual(appended.messages[0].createdAt, createdAt);
  assert.deepEqual(appended.session.lastActive, createdAt);
  const page = await client.listMessages({ sessionId: session.sessionId });
  assert.deepEqual(page.messages[0].createdAt, createdAt);
});

test('state: plain values in and out, with an append, by key, and a user state', async () => {
  const userId = newUser();
  const { session } = await client.createSession({ userId });
  const scope = { sessionId: session.sessionId };
  const value = { hotel: 'Bristol', nights: 3, ratio: 0.5, ok: true, none: null, list: [1, 'two', [], {}] };
  const { state } = await client.updateState({ scope, delta: { set: { cart: value, step: 'search' } } });
  assert.deepEqual(state, { cart: value, step: 'search' });

  const appended = await client.appendMessages({
    sessionId: session.sessionId,
    messages: [user('Book it.', 3)],
    stateDelta: { set: { step: 'done' }, remove: ['cart'] },
  });
  assert.equal(appended.session.messageCount, 1);
  assert.deepEqual((await client.getState({ scope })).state, { step: 'done' });
  assert.deepEqual((await client.getState({ scope, keys: ['step', 'absent'] })).state, { step: 'done' });

  const mine = await client.updateState({ scope: { userId }, delta: { set: { home: 'Bergen' } } });
  assert.deepEqual(mine.state, { home: 'Bergen' });
  assert.deepEqual((await client.getState({ scope: { userId } })).state, { home: 'Bergen' });

  const bad = await failure(client.updateState({ scope, delta: { set: { 'a\nb': 1 } } }));
  assert.equal(bad.code, status.INVALID_ARGUMENT);
  await assert.rejects(client.updateState({ scope, delta: { set: { a: Number.NaN } } }), TypeError);
});

test('apps: a session of an app, listed across its users and by user, and the app state', async () => {
  const app = `app-${randomUUID().slice(0, 8)}`;
  const [alice, bob] = [newUser(), newUser()];
  const { session: first } = await client.createSession({ userId: alice, app });
  const { session: second } = await client.createSession({ userId: bob, app });
  await client.createSession({ userId: alice });
  assert.equal(first.app, app);
  const page = await client.listSessions({ app, pageSize: 1 });
  assert.deepEqual(page.sessions.map((s) => s.sessionId), [second.sessionId]);
  const next = await client.listSessions({ app, pageSize: 1, pageToken: page.nextPageToken });
  assert.deepEqual(next.sessions.map((s) => s.sessionId), [first.sessionId]);
  const mine = await client.listSessions({ userId: alice, app });
  assert.deepEqual(mine.sessions.map((s) => s.sessionId), [first.sessionId]);
  const { state } = await client.updateState({ scope: { app }, delta: { set: { banner: 'sale', n: 2 } } });
  assert.deepEqual(state, { banner: 'sale', n: 2 });
  const bad = await failure(client.listSessions({ app: 'a b' }));
  assert.equal(bad.code, status.INVALID_ARGUMENT);
  assert.deepEqual(bad.fieldViolations.map((v) => v.field), ['app']);
});
