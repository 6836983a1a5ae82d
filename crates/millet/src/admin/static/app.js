// Millet dashboard: plain JS, no build step. The API key lives in
// sessionStorage and goes out as `Authorization: Bearer` on every call;
// a 401 brings the login form back.
'use strict';
(() => {
  const $ = (sel) => document.querySelector(sel);
  const KEY = 'millet.token';
  const POLL_MS = 1500;
  const HISTORY = 80; // chart points (two minutes at 1.5 s)
  let pollTimer = null;
  let mqttClient = null;
  const next = { clients: null, retained: null };
  const rates = []; // {in, out}
  let last = null; // {t, in, out}

  class Unauthorized extends Error {}

  function status(text, isError) {
    const s = $('#status');
    s.textContent = text || '';
    s.classList.toggle('error', !!isError);
  }

  async function api(method, path, body) {
    const headers = { Authorization: 'Bearer ' + sessionStorage.getItem(KEY) };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    if (r.status === 401) {
      logout('Your key was refused (401): log in again.');
      throw new Unauthorized();
    }
    const data = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(data.message || r.status + ' ' + r.statusText);
    return data;
  }

  // Run an action; show its error in the status line.
  async function guarded(fn) {
    try {
      await fn();
    } catch (e) {
      if (!(e instanceof Unauthorized)) status(e.message, true);
    }
  }

  // ---- login ----
  function showLogin(message) {
    $('#login').hidden = false;
    $('#tabs').hidden = true;
    $('#logout').hidden = true;
    document.querySelectorAll('.view').forEach((v) => { v.hidden = true; });
    $('#login-error').textContent = message || '';
    $('#token').focus();
  }

  function logout(message) {
    sessionStorage.removeItem(KEY);
    clearInterval(pollTimer);
    pollTimer = null;
    if (mqttClient) mqttClient.end(true);
    showLogin(message);
  }

  async function login(token) {
    sessionStorage.setItem(KEY, token);
    try {
      await api('GET', '/api/v1/stats');
    } catch (e) {
      if (!(e instanceof Unauthorized)) logout(e.message);
      return;
    }
    $('#login').hidden = true;
    $('#tabs').hidden = false;
    $('#logout').hidden = false;
    status('');
    show(location.hash.slice(1) || 'overview');
    poll();
    pollTimer = setInterval(poll, POLL_MS);
  }

  // ---- views ----
  const loaders = {
    overview: () => poll(),
    clients: () => loadClients(false),
    subscriptions: () => loadSubscriptions(),
    retained: () => loadRetained(false),
    bans: () => loadBans(),
    tester: () => {},
  };

  function show(view) {
    if (!loaders[view]) view = 'overview';
    document.querySelectorAll('.view').forEach((v) => { v.hidden = v.id !== 'view-' + view; });
    document.querySelectorAll('#tabs button').forEach((b) => {
      if (b.dataset.view === view) b.setAttribute('aria-current', 'page');
      else b.removeAttribute('aria-current');
    });
    if (location.hash !== '#' + view) history.replaceState(null, '', '#' + view);
    guarded(loaders[view]);
  }

  function cell(tr, text, cls) {
    const td = document.createElement('td');
    td.textContent = text === undefined || text === null ? '' : String(text);
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }

  function actionButton(tr, label, action, value, name) {
    const td = document.createElement('td');
    const b = document.createElement('button');
    b.type = 'button';
    b.className = 'danger';
    b.textContent = label;
    b.dataset.action = action;
    b.dataset.value = value;
    b.setAttribute('aria-label', label + ' ' + name);
    td.appendChild(b);
    tr.appendChild(td);
  }

  function fill(table, rows, render, append) {
    const body = $(table + ' tbody');
    if (!append) body.textContent = '';
    for (const r of rows) {
      const tr = document.createElement('tr');
      render(tr, r);
      body.appendChild(tr);
    }
    if (!body.children.length) {
      const tr = document.createElement('tr');
      const td = cell(tr, 'none');
      td.colSpan = $(table + ' thead tr').children.length;
      body.appendChild(tr);
    }
  }

  function query(form, extra) {
    const p = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (v !== '') p.set(k, v);
    for (const [k, v] of Object.entries(extra || {})) if (v !== null && v !== undefined) p.set(k, v);
    const s = p.toString();
    return s ? '?' + s : '';
  }

  async function loadClients(more) {
    const q = query($('#clients-form'), { after: more ? next.clients : null });
    const r = await api('GET', '/api/v1/clients' + q);
    next.clients = r.next;
    $('[data-more="clients"]').hidden = !r.next;
    fill('#clients-table', r.data, (tr, c) => {
      tr.dataset.clientId = c.client_id;
      cell(tr, c.client_id);
      cell(tr, c.connected ? 'yes' : 'no');
      cell(tr, c.username);
      cell(tr, c.peer);
      cell(tr, c.protocol);
      cell(tr, c.subscriptions);
      cell(tr, c.queued);
      actionButton(tr, 'Kick', 'kick', c.client_id, c.client_id);
    }, more);
  }

  async function loadSubscriptions() {
    const r = await api('GET', '/api/v1/subscriptions' + query($('#subscriptions-form')));
    fill('#subscriptions-table', r.data, (tr, s) => {
      cell(tr, s.client_id);
      cell(tr, s.filter);
      cell(tr, s.qos);
      const opts = [];
      if (s.no_local) opts.push('no local');
      if (s.retain_as_published) opts.push('retain as published');
      if (s.retain_handling) opts.push('retain handling ' + s.retain_handling);
      if (s.subscription_identifier) opts.push('id ' + s.subscription_identifier);
      cell(tr, opts.join(', '));
    });
  }

  async function loadRetained(more) {
    const q = query($('#retained-form'), { after: more ? next.retained : null });
    const r = await api('GET', '/api/v1/retained' + q);
    next.retained = r.next;
    $('[data-more="retained"]').hidden = !r.next;
    fill('#retained-table', r.data, (tr, m) => {
      cell(tr, m.topic);
      cell(tr, m.qos);
      cell(tr, m.payload_bytes);
      cell(tr, m.payload === undefined || m.payload === null ? '(binary)' : m.payload, 'payload');
      actionButton(tr, 'Delete', 'delete-retained', m.topic, m.topic);
    }, more);
  }

  async function loadBans() {
    const r = await api('GET', '/api/v1/bans');
    fill('#bans-table', r.data, (tr, b) => {
      cell(tr, b.target);
      cell(tr, b.expires_in === undefined ? 'never' : b.expires_in + ' s');
      actionButton(tr, 'Remove', 'unban', b.target, b.target);
    });
  }

  const actions = {
    kick: async (id) => {
      const path = '/api/v1/clients/' + encodeURIComponent(id);
      await api('DELETE', path);
      // The connection closes (and a clean session goes) just after the
      // answer: look again for up to 3 s before listing.
      for (let i = 0; i < 15; i += 1) {
        const c = await api('GET', path).catch((e) => (e instanceof Unauthorized ? Promise.reject(e) : null));
        if (!c || !c.connected) break;
        await new Promise((r) => { setTimeout(r, 200); });
      }
      status('Kicked ' + id);
      await loadClients(false);
    },
    'delete-retained': async (topic) => {
      await api('DELETE', '/api/v1/retained/' + topic.split('/').map(encodeURIComponent).join('/'));
      status('Deleted the retained message on ' + topic);
      await loadRetained(false);
    },
    unban: async (target) => {
      await api('DELETE', '/api/v1/bans/' + encodeURIComponent(target));
      status('Lifted the ban on ' + target);
      await loadBans();
    },
  };

  // ---- overview: stats and the live chart ----
  const fmtBytes = (n) => {
    const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i += 1; }
    return (i ? n.toFixed(1) : n) + ' ' + u[i];
  };
  const fmtUptime = (s) => {
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    return (d ? d + 'd ' : '') + (d || h ? h + 'h ' : '') + m + 'm ' + (s % 60) + 's';
  };

  function renderStats(n) {
    const items = [
      ['Connections', n.connections], ['Sessions', n.sessions], ['Subscriptions', n.subscriptions],
      ['Retained messages', n.retained_messages], ['Messages in', n.messages_received],
      ['Messages out', n.messages_sent], ['Dropped', n.messages_dropped],
      ['Memory used', fmtBytes(n.memory_used) + (n.memory_budget ? ' / ' + fmtBytes(n.memory_budget) : '')],
      ['Resident memory', n.resident_memory === null ? 'n/a' : fmtBytes(n.resident_memory)],
      ['Store', n.store], ['Uptime', fmtUptime(n.uptime)], ['Version', n.version],
    ];
    const dl = $('#stats');
    dl.textContent = '';
    for (const [k, v] of items) {
      const div = document.createElement('div');
      const dt = document.createElement('dt');
      const dd = document.createElement('dd');
      dt.textContent = k;
      dd.textContent = String(v);
      dd.dataset.stat = k;
      div.append(dt, dd);
      dl.appendChild(div);
    }
  }

  // A line chart on a canvas: two series, y from 0 to the largest value.
  function drawChart() {
    const c = $('#rate-chart');
    const dpr = window.devicePixelRatio || 1;
    const w = c.clientWidth || 800, h = c.clientHeight || 220;
    if (c.width !== Math.round(w * dpr)) { c.width = Math.round(w * dpr); c.height = Math.round(h * dpr); }
    const g = c.getContext('2d');
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    const css = getComputedStyle(document.documentElement);
    const pad = { l: 48, r: 8, t: 8, b: 18 };
    const max = Math.max(1, ...rates.map((p) => Math.max(p.in, p.out)));
    const top = Math.pow(10, Math.ceil(Math.log10(max)));
    const ymax = [top / 5, top / 2, top].find((v) => v >= max);
    const x = (i) => pad.l + (w - pad.l - pad.r) * (i / (HISTORY - 1));
    const y = (v) => h - pad.b - (h - pad.t - pad.b) * (v / ymax);
    g.font = '11px system-ui, sans-serif';
    g.fillStyle = css.getPropertyValue('--muted');
    g.strokeStyle = css.getPropertyValue('--line');
    g.lineWidth = 1;
    for (let k = 0; k <= 4; k += 1) {
      const v = (ymax * k) / 4;
      g.beginPath(); g.moveTo(pad.l, y(v)); g.lineTo(w - pad.r, y(v)); g.stroke();
      g.fillText(v >= 100 ? v.toFixed(0) : String(+v.toFixed(2)), 4, y(v) + 4);
    }
    const off = HISTORY - rates.length;
    for (const [key, color] of [['in', '--in'], ['out', '--out']]) {
      g.strokeStyle = css.getPropertyValue(color);
      g.lineWidth = 2;
      g.beginPath();
      rates.forEach((p, i) => (i ? g.lineTo : g.moveTo).call(g, x(off + i), y(p[key])));
      g.stroke();
    }
  }

  async function poll() {
    await guarded(async () => {
      const r = await api('GET', '/api/v1/stats');
      const n = r.node;
      const t = performance.now();
      const dt = last ? (t - last.t) / 1000 : 0;
      // a view's own poll can come right after the timer's: too short to rate
      if (!last || dt >= 0.5) {
        if (last) {
          rates.push({ in: Math.max(0, n.messages_received - last.in) / dt, out: Math.max(0, n.messages_sent - last.out) / dt });
          if (rates.length > HISTORY) rates.shift();
        }
        last = { t, in: n.messages_received, out: n.messages_sent };
      }
      renderStats(n);
      const p = rates[rates.length - 1];
      $('#rate-now').textContent = p ? `now: ${p.in.toFixed(1)} in, ${p.out.toFixed(1)} out per second` : '';
      if (!$('#view-overview').hidden) drawChart();
      const url = $('#ws-url');
      if (!url.value && !url.dataset.edited) url.value = wsUrl(n.listeners);
    });
  }

  // The first ws listener (or wss one) on the host this page came from.
  function wsUrl(l) {
    const path = (l && l.ws_path) || '/mqtt';
    const pick = (list) => (list && list.length ? list[0].split(':').pop() : null);
    const secure = location.protocol === 'https:' && l && l.wss && l.wss.length;
    const port = (secure ? pick(l.wss) : pick(l && l.ws)) || (l && pick(l.wss)) || '8083';
    const scheme = secure || (l && !(l.ws && l.ws.length) && l.wss && l.wss.length) ? 'wss' : 'ws';
    return `${scheme}://${location.hostname}:${port}${path}`;
  }

  // ---- topic tester ----
  function wsState(text) { $('#ws-state').textContent = text; }

  function toggleMqtt(url) {
    if (mqttClient) {
      mqttClient.end(true);
      mqttClient = null;
      $('#ws-connect').textContent = 'Connect';
      wsState('disconnected');
      return;
    }
    if (typeof mqtt !== 'object') { wsState('MQTT.js did not load'); return; }
    wsState('connecting');
    const c = mqtt.connect(url, {
      protocolVersion: 5,
      clientId: 'dashboard-' + Math.random().toString(16).slice(2, 10),
      reconnectPeriod: 0,
      connectTimeout: 5000,
      timerVariant: 'native',
    });
    mqttClient = c;
    $('#ws-connect').textContent = 'Disconnect';
    c.on('connect', () => wsState('connected'));
    c.on('error', (e) => wsState('error: ' + e.message));
    c.on('close', () => {
      if (mqttClient === c) { mqttClient = null; $('#ws-connect').textContent = 'Connect'; }
      if (!/^error/.test($('#ws-state').textContent)) wsState('disconnected');
    });
    c.on('message', (topic, payload, packet) => {
      const li = document.createElement('li');
      li.dataset.topic = topic;
      li.textContent = `${topic} [qos ${packet.qos}${packet.retain ? ', retained' : ''}]: ${new TextDecoder().decode(payload)}`;
      const list = $('#tester-messages');
      list.appendChild(li);
      while (list.children.length > 200) list.firstChild.remove();
    });
  }

  function needMqtt() {
    if (!mqttClient || !mqttClient.connected) throw new Error('connect the topic tester first');
    return mqttClient;
  }

  // ---- wiring ----
  function onSubmit(sel, fn) {
    $(sel).addEventListener('submit', (e) => {
      e.preventDefault();
      guarded(() => fn(e.target));
    });
  }

  document.addEventListener('DOMContentLoaded', () => {
    onSubmit('#login-form', async (f) => { await login(f.token.value.trim()); f.token.value = ''; });
    $('#logout').addEventListener('click', () => logout('Logged out.'));
    $('#tabs').addEventListener('click', (e) => {
      const b = e.target.closest('button[data-view]');
      if (b) show(b.dataset.view);
    });
    document.addEventListener('click', (e) => {
      const b = e.target.closest('button[data-action]');
      if (b) guarded(() => actions[b.dataset.action](b.dataset.value));
      const m = e.target.closest('button[data-more]');
      if (m) guarded(() => (m.dataset.more === 'clients' ? loadClients(true) : loadRetained(true)));
    });
    onSubmit('#clients-form', () => loadClients(false));
    onSubmit('#subscriptions-form', () => loadSubscriptions());
    onSubmit('#retained-form', () => loadRetained(false));
    onSubmit('#bans-form', async (f) => {
      const body = { target: f.elements.target.value.trim() };
      if (f.elements.duration.value) body.duration = Number(f.elements.duration.value);
      await api('POST', '/api/v1/bans', body);
      status('Banned ' + body.target);
      f.reset();
      await loadBans();
    });
    $('#ws-url').addEventListener('input', (e) => { e.target.dataset.edited = '1'; });
    onSubmit('#ws-form', async (f) => toggleMqtt(f.url.value.trim()));
    onSubmit('#sub-form', (f) => new Promise((resolve, reject) => {
      const filter = f.filter.value;
      needMqtt().subscribe(filter, { qos: Number(f.qos.value) }, (err, granted) => {
        if (err) return reject(err);
        const g = granted && granted[0];
        if (g && g.qos > 2) return reject(new Error(`subscription to ${filter} refused (reason ${g.qos})`));
        status('Subscribed to ' + filter);
        return resolve();
      });
    }));
    onSubmit('#pub-form', (f) => new Promise((resolve, reject) => {
      const topic = f.topic.value;
      needMqtt().publish(topic, f.payload.value, { qos: Number(f.qos.value), retain: f.retain.checked }, (err) => {
        if (err) return reject(err);
        status('Published to ' + topic);
        return resolve();
      });
    }));
    window.addEventListener('resize', () => { if (!$('#view-overview').hidden) drawChart(); });
    const saved = sessionStorage.getItem(KEY);
    if (saved) login(saved); else showLogin();
  });
})();
