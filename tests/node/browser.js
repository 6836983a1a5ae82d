// A real headless Chromium page (Debian's chromium, driven by
// playwright-core) loads page.html, which uses MQTT.js's browser bundle to
// connect over WebSocket, subscribe, and publish QoS 0/1/2.
// Usage: node browser.js WS_URL [CHROMIUM]   (default /usr/bin/chromium)
// Prints one JSON line {"ok": true, ...} and exits 0, or exits 1 with why.
'use strict';
const path = require('path');
const { pathToFileURL } = require('url');
const { chromium } = require('playwright-core');

const [url, executablePath = '/usr/bin/chromium'] = process.argv.slice(2);

(async () => {
  const browser = await chromium.launch({
    executablePath,
    headless: true,
    // Running as root in a container: Chromium's sandbox needs namespaces.
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
    timeout: 30000,
  });
  try {
    const page = await browser.newPage();
    const errors = [];
    page.on('pageerror', (e) => errors.push(String(e)));
    await page.goto(pathToFileURL(path.join(__dirname, 'page.html')).href);
    const result = await Promise.race([
      page.evaluate((u) => window.run(u), url),
      new Promise((resolve) => setTimeout(() => resolve({ ok: false, error: 'timed out' }), 15000)),
    ]);
    result.pageErrors = errors;
    console.log(JSON.stringify(result));
    process.exitCode = result.ok ? 0 : 1;
  } finally {
    await browser.close();
  }
})().catch((e) => {
  console.error(`FAIL: ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
