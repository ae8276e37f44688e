// End-to-end test of the demo page in headless Chromium against a real corelay binary.
//
// It starts the release server on ephemeral ports, opens http://127.0.0.1:<port>/?room=e2e
// in two tabs of one browser (fake camera and microphone), and waits until each tab
// decodes the other's video and receives its audio, as seen by getStats() on the
// page's subscriber connection (window.corelay.sub). Then it checks that muting shows
// on the other side and that closing a tab removes its tile.
//
// A second test takes the production path: the page over HTTPS from Debian's HAProxy
// running deploy/haproxy.cfg (TLS on a certificate made with openssl), signaling over
// wss:// through it, media straight to the instance.
//
// Run: cargo build --release && (cd tests/browser && npm ci && npm test)
// Env: CORELAY_BIN (default <repo>/target/release/corelay), CHROMIUM_PATH
// (default /usr/bin/chromium). With CI set, a missing browser or binary fails the test
// instead of skipping it.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import https from 'node:https';
import net from 'node:net';
import os from 'node:os';
import { createInterface } from 'node:readline';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const serverBin = process.env.CORELAY_BIN || path.join(repo, 'target', 'release', 'corelay');
const chromiumPath = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const haproxyPath = '/usr/sbin/haproxy';
const inCi = !!process.env.CI;

const MEDIA_DEADLINE_MS = 30_000;
const POLL_MS = 250;
const MIN_FRAMES = 10;

const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--use-fake-ui-for-media-stream', '--use-fake-device-for-media-stream',
  '--allow-loopback-in-peer-connection',
  // Real host addresses in candidates instead of .local names nobody resolves here.
  '--disable-features=WebRtcHideLocalIpsWithMdns',
];

/** Why the test cannot run here, or null. Missing prerequisites skip locally, fail in CI. */
function missingPrerequisite({ balancer = false } = {}) {
  if (balancer && !existsSync(haproxyPath)) {
    return `no HAProxy at ${haproxyPath} (apt-get install -y haproxy)`;
  }
  if (!existsSync(chromiumPath)) {
    return `no Chromium at ${chromiumPath} (apt-get install -y chromium, or set CHROMIUM_PATH)`;
  }
  if (!existsSync(serverBin)) {
    return `no server binary at ${serverBin} (cargo build --release, or set CORELAY_BIN)`;
  }
  return null;
}

/** Keeps the last `max` lines of a stream. */
function tail(max) {
  const lines = [];
  return {
    push(line) { lines.push(line); if (lines.length > max) lines.shift(); },
    text() { return lines.join('\n'); },
  };
}

/**
 * Starts the server and resolves with { port, proc, stdout, stderr } once it prints its
 * `listening http://<ip>:<port>` line.
 */
async function startServer(extraArgs = []) {
  const args = ['--port', '0', '--udp-port-base', '0', '--shards', '2', '--public-ip', '127.0.0.1',
    ...extraArgs];
  const proc = spawn(serverBin, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const stdout = tail(50);
  const stderr = tail(200);
  // Colour codes stripped: tracing colours its output even into a pipe.
  createInterface({ input: proc.stderr }).on('line', (l) => stderr.push(l.replace(/\x1b\[[0-9;]*m/g, '')));
  const port = await new Promise((resolve, reject) => {
    const fail = (why) => {
      clearTimeout(timer);
      proc.kill('SIGKILL');
      reject(new Error(`${why}\nserver stderr:\n${stderr.text()}`));
    };
    const timer = setTimeout(() => fail('server printed no "listening" line in 20 s'), 20_000);
    proc.once('error', (e) => fail(`cannot start ${serverBin}: ${e.message}`));
    proc.once('exit', (code, sig) => fail(`server exited early (code ${code}, signal ${sig})`));
    createInterface({ input: proc.stdout }).on('line', (line) => {
      stdout.push(line);
      const m = /^listening http:\/\/(\S+):(\d+)$/.exec(line.trim());
      if (m) { clearTimeout(timer); resolve(Number(m[2])); }
    });
  });
  proc.removeAllListeners('exit');
  const server = { port, proc, stdout, stderr, exited: null };
  proc.once('exit', (code, sig) => { server.exited = `code ${code}, signal ${sig}`; });
  return server;
}

/** A port nothing listens on now. */
function freePort() {
  return new Promise((resolve, reject) => {
    const probe = net.createServer().once('error', reject).listen(0, '127.0.0.1', () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
}

/** Status of `GET path` over TLS, trusting `ca` only; null when it cannot connect. */
function httpsStatus(port, path, ca) {
  return new Promise((resolve) => {
    https.get({ host: '127.0.0.1', port, path, ca, timeout: 2_000 }, (res) => {
      res.resume();
      resolve(res.statusCode);
    }).on('error', () => resolve(null));
  });
}

/**
 * HAProxy with deploy/haproxy.cfg on `port`, in front of one instance (named twice), with
 * a self-signed certificate for 127.0.0.1 in `dir`. Resolves once it proxies /health.
 */
async function startBalancer(port, instancePort, dir) {
  const key = path.join(dir, 'key.pem');
  const cert = path.join(dir, 'cert.pem');
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1',
    '-nodes', '-days', '1', '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1',
    '-keyout', key, '-out', cert], { stdio: 'ignore' });
  const pem = path.join(dir, 'balancer.pem');
  writeFileSync(pem, Buffer.concat([readFileSync(cert), readFileSync(key)]));
  const instance = `127.0.0.1:${instancePort}`;
  const proc = spawn(haproxyPath, ['-db', '-f', path.join(repo, 'deploy', 'haproxy.cfg')], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, CORELAY_LB_BIND: `127.0.0.1:${port}`, CORELAY_LB_CERT: pem,
      CORELAY_1: instance, CORELAY_2: instance },
  });
  const stderr = tail(50);
  createInterface({ input: proc.stderr }).on('line', (l) => stderr.push(l));
  const ca = readFileSync(cert);
  await waitFor('HAProxy to proxy /health', async () => {
    if (proc.exitCode !== null) throw new Error(`haproxy exited: ${stderr.text()}`);
    return (await httpsStatus(port, '/health', ca)) === 200;
  }, 10_000);
  return proc;
}

async function stopServer(server) {
  const { proc } = server;
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  const exited = new Promise((resolve) => proc.once('exit', resolve));
  proc.kill('SIGTERM');
  const timer = setTimeout(() => proc.kill('SIGKILL'), 5_000);
  await exited;
  clearTimeout(timer);
}

/** Inbound media of the page's subscriber connection, summed per kind. */
function subscriberStats(page) {
  return page.evaluate(async () => {
    const c = window.corelay;
    if (!c || !c.sub) return null;
    const out = {
      video: { framesDecoded: 0, packetsReceived: 0, bytesReceived: 0 },
      audio: { packetsReceived: 0, bytesReceived: 0 },
      connectionState: c.sub.connectionState,
      publisherState: c.pub && c.pub.connectionState,
    };
    (await c.sub.getStats()).forEach((s) => {
      if (s.type !== 'inbound-rtp' || !out[s.kind]) return;
      for (const k of Object.keys(out[s.kind])) out[s.kind][k] += s[k] || 0;
    });
    return out;
  });
}

/** Runs one step of the scenario; a failure names the step. */
async function step(name, fn) {
  const started = Date.now();
  try {
    await fn();
  } catch (err) {
    err.message = `step "${name}": ${err.message}`;
    throw err;
  }
  console.log(`ok: ${name} (${Date.now() - started} ms)`);
}

/** Polls `check` every POLL_MS until it returns a truthy value or the deadline passes. */
async function waitFor(what, check, deadlineMs = MEDIA_DEADLINE_MS) {
  const end = Date.now() + deadlineMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > end) throw new Error(`timed out after ${deadlineMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}

/** A tab on `url` whose console is kept for the failure report. */
async function openTab(context, url, name) {
  const page = await context.newPage();
  const consoleTail = tail(150);
  page.on('console', (m) => consoleTail.push(`[${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => consoleTail.push(`[pageerror] ${e.message}`));
  await page.goto(url);
  return { name, page, console: consoleTail };
}

/** Waits until each tab decodes video from and receives audio of the other. */
async function expectMutualMedia(tabs) {
  for (const tab of tabs) {
    const stats = await waitFor(`media in tab ${tab.name}`, async () => {
      const s = await subscriberStats(tab.page);
      const ok = s && s.video.framesDecoded > MIN_FRAMES &&
        s.audio.packetsReceived > 0 && s.audio.bytesReceived > 0;
      return ok && s;
    });
    console.log(`${tab.name} receives: ${JSON.stringify(stats)}`);
  }
}

/** Everything a person would need to see why a test failed. */
function reporter(tabs, server) {
  return async (err) => {
    const parts = [`FAILED: ${err.message}`];
    for (const tab of tabs) {
      let status = '(page closed)';
      let stats = null;
      if (!tab.page.isClosed()) {
        status = await tab.page.evaluate(() => window.corelay?.status).catch((e) => `(${e.message})`);
        stats = await subscriberStats(tab.page).catch(() => null);
      }
      parts.push(`--- tab ${tab.name}: status: ${status}`,
        `stats: ${JSON.stringify(stats)}`, 'console:', tab.console.text());
    }
    if (server.exited) parts.push(`--- the server exited during the test (${server.exited})`);
    parts.push('--- server stdout (tail):', server.stdout.text(),
      '--- server stderr (tail):', server.stderr.text());
    console.error(parts.join('\n'));
  };
}

/** Skips (or, in CI, fails) the test when something it needs is missing. */
function prerequisitesMet(t, options) {
  const missing = missingPrerequisite(options);
  if (missing) {
    if (inCi) assert.fail(missing);
    t.skip(missing);
  }
  return !missing;
}

test('two tabs see and hear each other through corelay', async (t) => {
  if (!prerequisitesMet(t)) return;

  const server = await startServer();
  let browser;
  const tabs = [];
  const report = reporter(tabs, server);

  try {
    browser = await chromium.launch({ executablePath: chromiumPath, headless: true, args: CHROMIUM_ARGS });
    const context = await browser.newContext();
    const base = `http://127.0.0.1:${server.port}/?room=e2e`;
    for (const name of ['alice', 'bob']) {
      tabs.push(await openTab(context, `${base}&user=${name}`, name));
    }

    await step('each tab decodes video and receives audio from the other', () => expectMutualMedia(tabs));

    await step('each tab shows one tile, named after the other peer', async () => {
      const ids = await Promise.all(tabs.map((tab) => tab.page.evaluate(() => window.corelay.peerId)));
      assert.ok(ids[0] && ids[1] && ids[0] !== ids[1], `distinct peer ids: ${ids}`);
      for (const [i, tab] of tabs.entries()) {
        const other = ids[1 - i];
        const tiles = await tab.page.evaluate(() =>
          [...document.querySelectorAll('.tile[data-peer]')].map((el) => ({
            peer: el.dataset.peer, label: el.querySelector('.label').textContent,
            videos: el.querySelectorAll('video').length, audios: el.querySelectorAll('audio').length,
          })));
        assert.deepEqual(tiles, [{ peer: other, label: tabs[1 - i].name, videos: 1, audios: 1 }]);
        const status = await tab.page.evaluate(() => window.corelay.status);
        assert.match(status, /^connected/, `status of tab ${tab.name}`);
        // A notice (an `error` from the server, a rejected SDP) is appended after " | ".
        assert.doesNotMatch(status, / \| /, `no notice in tab ${tab.name}`);
      }
    });

    await step('the server knows each tab\'s round trip and fits its resend window', async () => {
      // From Chromium's receiver reports; the window stays at its floor on loopback.
      const url = `http://127.0.0.1:${server.port}/debug/rooms`;
      const participants = await waitFor('a round trip for both tabs', async () => {
        const { rooms } = await (await fetch(url)).json();
        const all = rooms.flatMap((r) => r.participants);
        return all.length === 2 && all.every((p) => typeof p.rttMs === 'number') && all;
      });
      for (const p of participants) {
        assert.ok(p.rttMs >= 0 && p.rttMs < 50, `loopback round trip of ${p.userId}: ${p.rttMs} ms`);
        assert.equal(p.resendWindowMs, 200, `resend window of ${p.userId}`);
      }
    });

    await step('muting the microphone shows on the other tab', async () => {
      const [alice, bob] = tabs;
      await alice.page.click('#mic');
      await waitFor('"mic off" in bob\'s tile of alice', () =>
        bob.page.evaluate(() => document.querySelector('.tile[data-peer] .label').textContent.includes('mic off')),
        5_000);
    });

    await step('closing a tab removes its tile in the other', async () => {
      const [alice, bob] = tabs;
      await alice.page.close();
      await waitFor('alice\'s tile to disappear in bob', () =>
        bob.page.evaluate(() => document.querySelectorAll('.tile[data-peer]').length === 0), 10_000);
    });

    await step('a tab that comes back is seen again', async () => {
      // Bob's next offer sets the m-lines of alice's old tracks inactive and adds
      // her new ones: Chromium must take both, and decode the new video.
      const bob = tabs[1];
      const before = (await subscriberStats(bob.page)).video.framesDecoded;
      tabs[0] = await openTab(browser.contexts()[0], `${base}&user=alice`, 'alice again');
      await waitFor('video from the returning alice in bob', async () => {
        const s = await subscriberStats(bob.page);
        return s && s.video.framesDecoded > before + MIN_FRAMES;
      });
      const status = await bob.page.evaluate(() => window.corelay.status);
      assert.doesNotMatch(status, / \| /, 'no notice in tab bob');
      const tiles = await bob.page.evaluate(() => document.querySelectorAll('.tile[data-peer] video').length);
      assert.equal(tiles, 1, 'one tile with video in bob');
    });
  } catch (err) {
    await report(err);
    throw err;
  } finally {
    await browser?.close().catch(() => {});
    await stopServer(server);
  }
});

test('two tabs see and hear each other through the TLS balancer', async (t) => {
  if (!prerequisitesMet(t, { balancer: true })) return;

  const dir = mkdtempSync(path.join(os.tmpdir(), 'corelay-e2e-tls-'));
  const port = await freePort();
  const origin = `https://127.0.0.1:${port}`;
  // The page's origin is the balancer's, which the instance must allow.
  const server = await startServer(['--cors-origins', origin]);
  let balancer;
  let browser;
  const tabs = [];
  const report = reporter(tabs, server);

  try {
    balancer = await startBalancer(port, server.port, dir);
    browser = await chromium.launch({ executablePath: chromiumPath, headless: true, args: CHROMIUM_ARGS });
    // The certificate is the test's own; the page is still a secure context.
    const context = await browser.newContext({ ignoreHTTPSErrors: true });
    for (const name of ['carol', 'dave']) {
      tabs.push(await openTab(context, `${origin}/?room=tls&user=${name}`, name));
    }

    await step('the page is a secure context and signals over wss://', async () => {
      for (const tab of tabs) {
        assert.equal(await tab.page.evaluate(() => window.isSecureContext), true);
        // Open, so the instance took the balancer's origin.
        const ws = await waitFor(`an open WebSocket in tab ${tab.name}`, () =>
          tab.page.evaluate(() => window.corelay?.ws?.readyState === WebSocket.OPEN && window.corelay.ws.url),
        10_000);
        assert.match(ws, new RegExp(`^wss://127\\.0\\.0\\.1:${port}/ws\\?room=tls`));
      }
    });

    await step('each tab decodes video and receives audio from the other', () => expectMutualMedia(tabs));
  } catch (err) {
    await report(err);
    throw err;
  } finally {
    await browser?.close().catch(() => {});
    balancer?.kill();
    await stopServer(server);
    rmSync(dir, { recursive: true, force: true });
  }
});
