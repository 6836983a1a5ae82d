// MQTT.js over WebSocket against a running broker: connect, subscribe at
// QoS 2, publish at QoS 0, 1 and 2, and receive all three.
// Usage: node ws_client.js URL PROTOCOL_VERSION [CA_FILE]
// Prints one JSON line {"ok": true, ...} and exits 0, or exits 1 with why.
'use strict';
const fs = require('fs');
const mqtt = require('mqtt');

const [url, version, caFile] = process.argv.slice(2);
const opts = {
  protocolVersion: Number(version || 4),
  clientId: `mqttjs-${process.pid}-${Date.now()}`,
  reconnectPeriod: 0,
  connectTimeout: 5000,
};
if (caFile) {
  opts.ca = fs.readFileSync(caFile);
  opts.rejectUnauthorized = true;
}
const topic = `ws/node/${opts.clientId}`;
const fail = (why) => {
  console.error(`FAIL: ${why}`);
  process.exit(1);
};
setTimeout(() => fail('timed out'), 10000).unref();

const client = mqtt.connect(url, opts);
const got = [];
client.on('error', (e) => fail(`client error: ${e.message}`));
client.on('close', () => {
  if (got.length < 3) fail('connection closed early');
});
client.on('connect', (connack) => {
  client.subscribe(topic, { qos: 2 }, (err, granted) => {
    if (err) return fail(`subscribe: ${err.message}`);
    if (granted[0].qos !== 2) return fail(`granted ${JSON.stringify(granted)}`);
    for (const qos of [0, 1, 2]) {
      client.publish(topic, `qos${qos}`, { qos }, (e) => {
        if (e) fail(`publish qos ${qos}: ${e.message}`);
      });
    }
  });
});
client.on('message', (t, payload, packet) => {
  got.push({ topic: t, payload: payload.toString(), qos: packet.qos });
  if (got.length === 3) {
    got.sort((a, b) => a.payload.localeCompare(b.payload));
    client.end(false, () => {
      console.log(JSON.stringify({ ok: true, protocolVersion: opts.protocolVersion, messages: got }));
      process.exit(0);
    });
  }
});
