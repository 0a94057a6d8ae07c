'use strict';
// A live server for the tests: the one at CHATSESSION_ADDRESS, else `chatsession-server` from the
// repository's .venv (or CHATSESSION_SERVER_BIN) on a free port with an embedded Valkey.
// And a TCP relay whose connections a test can cut, to break a stream as a network would.

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

/** A relay from a free local port to `target`; `cut()` drops every connection it carries. */
async function relay(target) {
  const [host, port] = [target.slice(0, target.lastIndexOf(':')), Number(target.slice(target.lastIndexOf(':') + 1))];
  const sockets = new Set();
  const server = net.createServer((inbound) => {
    const outbound = net.connect(port, host);
    for (const [a, b] of [[inbound, outbound], [outbound, inbound]]) {
      sockets.add(a);
      a.pipe(b);
      a.on('error', () => b.destroy());
      a.on('close', () => {
        sockets.delete(a);
        b.destroy();
      });
    }
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    address: `127.0.0.1:${server.address().port}`,
    cut: () => sockets.forEach((s) => s.destroy()),
    close: async () => {
      sockets.forEach((s) => s.destroy());
      server.close();
    },
  };
}

module.exports = { liveServer, relay };
