'use strict';
// A live server for the tests: the one at CHATSESSION_ADDRESS, else `chatsession-server` from the
// repository's .venv (or CHATSESSION_SERVER_BIN) on a free port with an embedded Valkey.
// And a TCP relay whose connections a test can cut, to break a stream as a network would.

const { randomUUID } = require('node:crypto');
const net = require('node:net');
const path = require('node:path');
const readline = require('node:readline');
const { spawn } = require('node:child_process');
const { once } = require('node:events');

const SERVER_BIN = process.env.CHATSESSION_SERVER_BIN ?? path.resolve(__dirname, '..', '..', '..', '.venv', 'bin', 'chatsession-server');
const SERVING = /serving on [\d.]+:(\d+)/;

/** @returns {Promise<{address: string, stop: () => Promise<void>}>} */
async function liveServer() {
  if (process.env.CHATSESSION_ADDRESS) return { address: process.env.CHATSESSION_ADDRESS, stop: async () => {} };
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('CHATSESSION_')));
  const child = spawn(SERVER_BIN, ['--listen', '127.0.0.1:0'], {
    env: { ...env, CHATSESSION_EMBEDDED_VALKEY: '1' },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  const lines = [];
  const port = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`server not serving within 30 s:\n${lines.join('\n')}`)), 30_000);
    readline.createInterface({ input: child.stderr }).on('line', (line) => {
      lines.push(line);
      const serving = SERVING.exec(line);
      if (serving) {
        clearTimeout(timer);
        resolve(Number(serving[1]));
      }
    });
    child.on('error', reject);
    child.on('exit', (code) => reject(new Error(`server exited (${code}):\n${lines.join('\n')}`)));
  });
  return {
    address: `127.0.0.1:${port}`,
    stop: async () => {
      if (child.exitCode !== null) return;
      child.kill('SIGTERM');
      await once(child, 'exit');
    },
  };
}

/**
 * A relay from a local port (`port`, else a free one) to `target`. `cut()` drops every connection
 * it carries. `dropNextReply()` makes it drop the connection that next carries a response message
 * to the client, before the client has it: the server has done the call, the client is left
 * without its answer, as when a network fails at the worst moment.
 */
async function relay(target, { port = 0 } = {}) {
  const [host, targetPort] = [target.slice(0, target.lastIndexOf(':')), Number(target.slice(target.lastIndexOf(':') + 1))];
  const sockets = new Set();
  let dropReply = false;
  const server = net.createServer((inbound) => {
    const outbound = net.connect(targetPort, host);
    for (const [a, b] of [[inbound, outbound], [outbound, inbound]]) {
      sockets.add(a);
      a.on('error', () => b.destroy());
      a.on('close', () => {
        sockets.delete(a);
        b.destroy();
      });
    }
    inbound.pipe(outbound);
    // Server to client frame by frame, to see where a response message starts: an HTTP/2 frame
    // is a 9-byte header (24-bit length, type, flags, stream id) and its payload; type 0 is DATA.
    let pending = Buffer.alloc(0);
    outbound.on('data', (chunk) => {
      pending = Buffer.concat([pending, chunk]);
      while (pending.length >= 9 && pending.length >= 9 + pending.readUIntBE(0, 3)) {
        const size = 9 + pending.readUIntBE(0, 3);
        const frame = pending.subarray(0, size);
        pending = pending.subarray(size);
        if (dropReply && frame[3] === 0) {
          dropReply = false;
          inbound.destroy();
          outbound.destroy();
          return;
        }
        inbound.write(frame);
      }
    });
  });
  server.listen(port, '127.0.0.1');
  await once(server, 'listening');
  return {
    address: `127.0.0.1:${server.address().port}`,
    cut: () => sockets.forEach((s) => s.destroy()),
    dropNextReply: () => {
      dropReply = true;
    },
    /** Whether the reply dropNextReply() asked to drop has been dropped. */
    replyDropped: () => !dropReply,
    close: async () => {
      sockets.forEach((s) => s.destroy());
      server.close();
    },
  };
}

/** A local port nothing listens on (for now). */
async function freePort() {
  const server = net.createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address();
  server.close();
  await once(server, 'close');
  return port;
}

/**
 * A grpc-js client interceptor counting the attempts a client makes, by RPC name ('GetSession').
 * `reached(n)` resolves once `n` attempts in all have started.
 */
function attemptCounter() {
  /** @type {string[]} */
  const started = [];
  const waiters = [];
  return {
    interceptor: (options, nextCall) => {
      started.push(options.method_definition.path.split('/').pop());
      for (const waiter of waiters.filter((w) => started.length >= w.n)) {
        waiters.splice(waiters.indexOf(waiter), 1);
        waiter.resolve();
      }
      return nextCall(options);
    },
    count: (rpc) => started.filter((name) => name === rpc).length,
    reset: () => {
      started.length = 0;
    },
    reached: (n) => (started.length >= n ? Promise.resolve() : new Promise((resolve) => waiters.push({ n, resolve }))),
  };
}

/** A user message of `content`, as the tests append them. */
const user = (content, tokens = 1) => ({ role: 'ROLE_USER', content, tokens });
/** A user id no other test run uses. */
const newUser = () => `node-${randomUUID()}`;

module.exports = { attemptCounter, freePort, liveServer, newUser, relay, user };
