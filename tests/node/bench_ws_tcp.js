// QoS 0 throughput through Millet with MQTT.js, over TCP or WebSocket:
// a subscriber process counts what arrives while a publisher process sends
// N messages of SIZE bytes as fast as MQTT.js writes them. Not a test: a
// rough relative measurement (MQTT.js's own cost is in the loop, the same
// for both transports). Run without ROLE it forks the two roles itself.
// Usage: node bench_ws_tcp.js URL [N=200000] [SIZE=64]
//   e.g. mqtt://127.0.0.1:1883   ws://127.0.0.1:8083/mqtt
'use strict';
const { fork } = require('child_process');
const mqtt = require('mqtt');

const [url, nArg, sizeArg] = process.argv.slice(2);
const N = Number(nArg || 200000);
const SIZE = Number(sizeArg || 64);
const topic = `bench/ws-tcp/${process.env.BENCH_TOPIC || process.pid}`;
const opts = { reconnectPeriod: 0, protocolVersion: 4 };
const role = process.env.ROLE;

if (!role) {
  const env = { ...process.env, BENCH_TOPIC: String(process.pid) };
  const sub = fork(__filename, process.argv.slice(2), { env: { ...env, ROLE: 'sub' } });
  sub.on('message', (m) => {
    if (m === 'ready') fork(__filename, process.argv.slice(2), { env: { ...env, ROLE: 'pub' } });
    else {
      console.log(JSON.stringify({ url, size: SIZE, ...m }));
      process.exit(0);
    }
  });
} else if (role === 'sub') {
  const sub = mqtt.connect(process.env.SUB_URL || url, { ...opts, clientId: `bench-sub-${process.pid}` });
  let got = 0;
  let t0 = 0n;
  let tLast = 0n;
  const done = (why) => {
    const secs = Number((tLast - t0) / 1000n) / 1e6;
    process.send({ sent: N, received: got, seconds: +secs.toFixed(3),
      per_second: secs > 0 ? Math.round(got / secs) : 0, why }, () => process.exit(0));
  };
  sub.on('message', () => {
    tLast = process.hrtime.bigint();
    if (got === 0) t0 = tLast;
    got += 1;
    if (got === N) done('all received');
  });
  sub.on('connect', () => sub.subscribe(topic, { qos: 0 }, () => {
    process.send('ready');
    let last = -1;
    setInterval(() => { // stop once nothing more arrives for 3 s
      if (got === last && got > 0) done('quiet for 3 s (QoS 0 dropped by a full queue)');
      last = got;
    }, 3000);
  }));
} else {
  const pub = mqtt.connect(url, { ...opts, clientId: `bench-pub-${process.pid}` });
  const payload = Buffer.alloc(SIZE, 120);
  pub.on('connect', async () => {
    for (let i = 0; i < N; i++) {
      // wait for the write to drain every 1000 messages (no unbounded buffering)
      if (i % 1000 === 999) await new Promise((r) => pub.publish(topic, payload, { qos: 0 }, r));
      else pub.publish(topic, payload, { qos: 0 });
    }
    pub.end(false, () => process.exit(0));
  });
}
