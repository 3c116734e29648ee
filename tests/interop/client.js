// The Node side of tests/interop: amqplib from npm (scripts/interop-deps installs it into
// tests/interop/node_modules), run by test_interop.py.
//
//   node client.js publish URL QUEUE ID...   publish one message per ID (its message_id)
//                                            with every field type amqplib can send
//   node client.js read URL QUEUE N          basic.get N messages (up to 30 s); print them
//
// Printed as JSON, each header value as {"t": wire type, "v": value} (see
// test_interop.py). A JavaScript value does not say its wire type (every integer is a
// Number), so the header table amqplib received is also kept as bytes: amqplib decodes
// it (any type it cannot read fails the read), and the report is read from those bytes.
'use strict';

const path = require('node:path');
const lib = path.join(__dirname, 'node_modules', 'amqplib', 'lib');
// Before amqplib's defs.js binds codec.decodeFields: keep each decoded table's bytes.
const codec = require(path.join(lib, 'codec.js'));
const received = new WeakMap();
const decodeFields = codec.decodeFields;
codec.decodeFields = (slice) => {
  const fields = decodeFields(slice);
  received.set(fields, Buffer.from(slice));
  return fields;
};
const amqp = require('amqplib');

function walkTable(buf) {
  const out = {};
  let pos = 0;
  while (pos < buf.length) {
    const n = buf[pos];
    const key = buf.toString('utf8', pos + 1, pos + 1 + n);
    let node;
    [node, pos] = walkValue(buf, pos + 1 + n);
    out[key] = node;
  }
  return out;
}

function walkValue(buf, pos) {
  const t = String.fromCharCode(buf[pos]);
  pos++;
  const hex = (n) => buf.subarray(pos, pos + n).toString('hex');
  const long = () => buf.readUInt32BE(pos);
  switch (t) {
    case 't': return [{ t, v: buf[pos] !== 0 }, pos + 1];
    case 'b': return [{ t, v: String(buf.readInt8(pos)) }, pos + 1];
    case 'B': return [{ t, v: String(buf.readUInt8(pos)) }, pos + 1];
    case 's': return [{ t, v: String(buf.readInt16BE(pos)) }, pos + 2];
    case 'u': return [{ t, v: String(buf.readUInt16BE(pos)) }, pos + 2];
    case 'I': return [{ t, v: String(buf.readInt32BE(pos)) }, pos + 4];
    case 'i': return [{ t, v: String(buf.readUInt32BE(pos)) }, pos + 4];
    case 'l': return [{ t, v: String(buf.readBigInt64BE(pos)) }, pos + 8];
    case 'f': return [{ t, v: hex(4) }, pos + 4];
    case 'd': return [{ t, v: hex(8) }, pos + 8];
    case 'D': return [{ t, v: [buf[pos], String(buf.readInt32BE(pos + 1))] }, pos + 5];
    case 'S':
    case 'x': {
      const n = long();
      pos += 4;
      return [{ t, v: hex(n) }, pos + n];
    }
    case 'T': return [{ t, v: String(buf.readBigInt64BE(pos)) }, pos + 8];
    case 'F': {
      const n = long();
      return [{ t, v: walkTable(buf.subarray(pos + 4, pos + 4 + n)) }, pos + 4 + n];
    }
    case 'A': {
      const end = pos + 4 + long();
      const items = [];
      pos += 4;
      while (pos < end) {
        let node;
        [node, pos] = walkValue(buf, pos);
        items.push(node);
      }
      return [{ t, v: items }, end];
    }
    case 'V': return [{ t, v: null }, pos];
  }
  throw new Error(`unknown field type ${t}`);
}

const ts = (seconds) => ({ '!': 'timestamp', value: seconds });

function headers() {
  return {
    bool_true: true,
    bool_false: false,
    byte_min: -128,
    byte_max: 127,
    short_min: -32768,
    short_max: 32767,
    int_min: -2147483648,
    int_max: 2147483647,
    int_1000: { '!': 'int', value: 1000 },
    long_5: { '!': 'long', value: 5 },
    long_2_40: 2 ** 40,
    long_min: { '!': 'long', value: -(2n ** 63n) },
    long_max: { '!': 'long', value: 2n ** 63n - 1n },
    uint8_max: { '!': 'uint8', value: 255 },
    uint16_max: { '!': 'uint16', value: 65535 },
    uint32_max: { '!': 'uint32', value: 4294967295 },
    float: { '!': 'float', value: 1.5 },
    double: 0.1,
    double_max: Number.MAX_VALUE,
    'double_-0': { '!': 'double', value: -0 },
    decimal: { '!': 'decimal', value: { places: 2, digits: 12345 } },
    decimal_max: { '!': 'decimal', value: { places: 255, digits: 2147483647 } },
    string: 'héllo ✓',
    string_empty: '',
    bytes: Buffer.from([0, 1, 255]),
    bytes_empty: Buffer.alloc(0),
    ts_0: ts(0),
    'ts_2**32-1': ts(2 ** 32 - 1),
    'ts_2**32': ts(2 ** 32),
    ts_2200: ts(7258118400),
    ts_9999: ts(253402300799),
    ts_10000: ts(253402300800),
    ts_int64_max: ts(2n ** 63n - 1n),
    void: null,
    table: {
      nested: { deeper: [{ '!': 'long', value: 1 }, 'two', { three: { '!': 'short', value: 3 } }] },
      ts: ts(7258118400),
      empty: {},
    },
    array: [1, 300, 70000, 2 ** 40, { '!': 'float', value: 0.5 }, 0.25, 's', Buffer.from([1]), null, true,
      ts(253402300800), [], { k: { '!': 'uint8', value: 7 } }],
  };
}

function describe(props, body, table) {
  const out = {
    content_type: props.contentType ?? null,
    content_encoding: props.contentEncoding ?? null,
    delivery_mode: props.deliveryMode ?? null,
    priority: props.priority ?? null,
    correlation_id: props.correlationId ?? null,
    reply_to: props.replyTo ?? null,
    expiration: props.expiration ?? null,
    message_id: props.messageId ?? null,
    timestamp: props.timestamp === undefined ? null : String(props.timestamp),
    message_type: props.type ?? null,
    user_id: props.userId ?? null,
    app_id: props.appId ?? null,
    cluster_id: props.clusterId ?? null,
    headers: table === undefined ? null : walkTable(table),
    body: body.toString('hex'),
  };
  return out;
}

async function main() {
  const [mode, url, queue, ...rest] = process.argv.slice(2);
  const conn = await amqp.connect(url);
  const out = [];
  try {
    if (mode === 'publish') {
      const ch = await conn.createConfirmChannel();
      const body = Buffer.from('{"from": "node"}');
      for (const id of rest) {
        const options = {
          contentType: 'application/json', contentEncoding: 'identity', headers: headers(),
          deliveryMode: 1, priority: 9, correlationId: 'corr-node', replyTo: 'reply-node',
          expiration: '3600000', messageId: id, timestamp: 7258118400, type: 'interop.test',
          userId: 'guest', appId: 'node-client', mandatory: true,
        };
        ch.publish('', queue, body, options);
        await ch.waitForConfirms();
        // what went on the wire: amqplib's own encoding of the table
        const buf = Buffer.alloc(65536);
        const size = codec.encodeTable(buf, options.headers, 0);
        out.push(describe(options, body, buf.subarray(4, size)));
      }
    } else if (mode === 'read') {
      const ch = await conn.createChannel();
      const deadline = Date.now() + 30000;
      while (out.length < Number(rest[0])) {
        const msg = await ch.get(queue, { noAck: true });
        if (msg === false) {
          if (Date.now() > deadline) throw new Error(`only ${out.length} of ${rest[0]} in ${queue}`);
          await new Promise((resolve) => setTimeout(resolve, 50));
          continue;
        }
        const h = msg.properties.headers;
        out.push(describe(msg.properties, msg.content, h === undefined ? undefined : received.get(h)));
      }
    } else {
      throw new Error(`unknown mode ${mode}`);
    }
  } finally {
    await conn.close();
  }
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch((err) => {
  process.stderr.write(`node client: ${err.stack || err}\n`);
  process.exit(1);
});
