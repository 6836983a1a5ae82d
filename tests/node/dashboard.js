// The admin dashboard in a real headless Chromium (Debian's chromium,
// driven by playwright-core): log in with the API token, find a client,
// kick it, add and lift a ban, publish and subscribe from the topic
// tester over MQTT-over-WebSocket, and see a retained message listed and
// deleted. Every step waits for a DOM condition (with a timeout), never
// for a fixed time.
// Usage: node dashboard.js ADMIN_URL TOKEN CLIENT_ID WS_URL TOPIC SHOT_DIR [CHROMIUM]
// Prints one JSON line {"ok": true, ...} and exits 0, or exits 1 with why.
'use strict';
const path = require('path');
const { chromium } = require('playwright-core');

const [admin, token, clientId, wsUrl, topic, shots, executablePath = '/usr/bin/chromium'] = process.argv.slice(2);
const T = { timeout: 15000 };

function check(cond, what) {
  if (!cond) throw new Error(what);
}

(async () => {
  const browser = await chromium.launch({
    executablePath,
    headless: true,
    // Running as root in a container: Chromium's sandbox needs namespaces.
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
    timeout: 30000,
  });
  const errors = [];
  const steps = [];
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
    page.on('pageerror', (e) => errors.push('pageerror: ' + String(e)));
    // API answers like 401 (the wrong key below) and 404 (a kicked client
    // looked up until gone) are part of the flow; Chromium logs each one.
    const apiStatus = /^Failed to load resource: the server responded with a status of (401|404)/;
    page.on('console', (m) => {
      if (m.type() === 'error' && !apiStatus.test(m.text())) errors.push('console: ' + m.text());
    });
    page.on('requestfailed', (r) => errors.push('requestfailed: ' + r.url()));
    // anything else the page loads (the page, scripts, style, icon) must be there
    page.on('response', (r) => {
      if (r.status() >= 400 && !new URL(r.url()).pathname.startsWith('/api/v1/')) {
        errors.push(`HTTP ${r.status()}: ${r.url()}`);
      }
    });
    const shot = (name) => page.screenshot({ path: path.join(shots, name + '.png'), fullPage: true });
    const status = (text) => page.waitForFunction(
      (t) => document.querySelector('#status').textContent.includes(t), text, T);

    // 1. the root redirects to the page, which asks for a key; a wrong one is refused
    const resp = await page.goto(admin + '/');
    check(resp.ok() && page.url() === admin + '/dashboard', 'GET / did not land on /dashboard: ' + page.url());
    await page.waitForSelector('#login-form', { state: 'visible', ...T });
    check(await page.isHidden('#tabs'), 'the views show before logging in');
    await page.fill('#token', 'mlk_wrong');
    await page.click('#login-form button[type=submit]');
    await page.waitForFunction(() => /401/.test(document.querySelector('#login-error').textContent), null, T);
    await page.fill('#token', token);
    await page.click('#login-form button[type=submit]');
    await page.waitForSelector('#tabs', { state: 'visible', ...T });
    await page.waitForSelector('#stats dd[data-stat="Connections"]', T);
    check(await page.isHidden('#login'), 'the login form is still shown');
    const conns = Number(await page.textContent('#stats dd[data-stat="Connections"]'));
    check(conns >= 1, 'overview: connections = ' + conns);
    // the test's steady traffic shows as rates in and out (two polls at least)
    await page.waitForFunction(() => /now: [1-9][0-9.]* in, [1-9][0-9.]* out per second/
      .test(document.querySelector('#rate-now').textContent), null, T);
    steps.push('login');

    // 2. the test client is in the clients table
    await page.click('#tabs button[data-view=clients]');
    await page.fill('#clients-prefix', clientId);
    await page.click('#clients-form button[type=submit]');
    const row = `#clients-table tbody tr[data-client-id="${clientId}"]`;
    await page.waitForSelector(row, T);
    const cells = await page.$$eval(row + ' td', (tds) => tds.map((td) => td.textContent));
    check(cells[0] === clientId && cells[1] === 'yes' && cells[4] === '5', 'client row: ' + JSON.stringify(cells));
    steps.push('client listed');
    await shot('clients');

    // 3. kick it: the row goes away
    await page.click(`${row} button[data-action=kick]`);
    await status('Kicked ' + clientId);
    await page.waitForSelector(row, { state: 'detached', ...T });
    steps.push('kicked');

    // bans: add one, see it, lift it
    const target = 'client:' + clientId + '-banned';
    await page.click('#tabs button[data-view=bans]');
    await page.fill('#ban-target', target);
    await page.fill('#ban-duration', '600');
    await page.click('#bans-form button[type=submit]');
    const banRow = `#bans-table button[data-action=unban][data-value="${target}"]`;
    await page.waitForSelector(banRow, T);
    await page.click(banRow);
    await status('Lifted the ban on ' + target);
    await page.waitForSelector(banRow, { state: 'detached', ...T });
    steps.push('ban added and lifted');

    // 4. the topic tester: its URL came from the stats' listener list
    await page.click('#tabs button[data-view=tester]');
    const url = await page.inputValue('#ws-url');
    check(url === wsUrl, `tester URL ${url}, expected ${wsUrl}`);
    await page.click('#ws-connect');
    await page.waitForFunction(() => document.querySelector('#ws-state').textContent === 'connected', null, T);
    await page.fill('#sub-filter', topic + '/#');
    await page.selectOption('#sub-qos', '1');
    await page.click('#sub-form button[type=submit]');
    await status('Subscribed to ' + topic + '/#');
    const payload = 'hello from the dashboard';
    await page.fill('#pub-topic', topic + '/greeting');
    await page.fill('#pub-payload', payload);
    await page.selectOption('#pub-qos', '1');
    await page.check('#pub-form input[name=retain]');
    await page.click('#pub-form button[type=submit]');
    await status('Published to ' + topic + '/greeting');
    const li = `#tester-messages li[data-topic="${topic}/greeting"]`;
    await page.waitForSelector(li, T);
    const got = await page.textContent(li);
    check(got.endsWith(': ' + payload), 'tester got ' + got);
    steps.push('published and received');
    await shot('tester');

    // the retained message it left: listed, then deleted
    await page.click('#tabs button[data-view=retained]');
    await page.fill('#retained-filter', topic + '/#');
    await page.click('#retained-form button[type=submit]');
    const ret = `#retained-table button[data-action=delete-retained][data-value="${topic}/greeting"]`;
    await page.waitForSelector(ret, T);
    await page.click(ret);
    await status('Deleted the retained message on ' + topic + '/greeting');
    await page.waitForSelector(ret, { state: 'detached', ...T });
    steps.push('retained listed and deleted');

    // back to the overview, its chart a few points longer, for the screenshot
    await page.click('#tabs button[data-view=overview]');
    await page.waitForSelector('#view-overview', { state: 'visible', ...T });
    await shot('overview');

    // logging out forgets the key
    await page.click('#logout');
    await page.waitForSelector('#login-form', { state: 'visible', ...T });
    check(await page.evaluate(() => sessionStorage.length) === 0, 'the key outlived the logout');
    steps.push('logged out');

    check(errors.length === 0, 'browser errors: ' + errors.join('; '));
    console.log(JSON.stringify({ ok: true, steps, received: got }));
  } catch (e) {
    console.log(JSON.stringify({ ok: false, error: String(e && e.message ? e.message : e), steps, errors }));
    process.exitCode = 1;
  } finally {
    await browser.close();
  }
})().catch((e) => {
  console.error(`FAIL: ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
