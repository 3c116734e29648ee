// The Java side of tests/interop: RabbitMQ's Java client (Debian's librabbitmq-client-java),
// compiled and run by test_interop.py.
//
//   java Client publish URL QUEUE ID...   publish one message per ID (its message_id) with
//                                         every field type Java can send; print what was sent
//   java Client read URL QUEUE N          basic.get N messages (waiting up to 30 s); print them
//
// Printed as JSON, each header value as {"t": wire type, "v": value} (see test_interop.py).

import com.rabbitmq.client.AMQP;
import com.rabbitmq.client.Channel;
import com.rabbitmq.client.Connection;
import com.rabbitmq.client.ConnectionFactory;
import com.rabbitmq.client.GetResponse;
import com.rabbitmq.client.LongString;
import com.rabbitmq.client.impl.LongStringHelper;
import java.math.BigDecimal;
import java.math.BigInteger;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Date;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

public class Client {
    static String hex(byte[] bytes) {
        StringBuilder out = new StringBuilder();
        for (byte b : bytes) out.append(String.format("%02x", b & 0xff));
        return out.toString();
    }

    static String str(String s) {
        if (s == null) return "null";
        StringBuilder out = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            if (c == '"' || c == '\\') out.append('\\').append(c);
            else if (c < 0x20 || c > 0x7e) out.append(String.format("\\u%04x", (int) c));
            else out.append(c);
        }
        return out.append('"').toString();
    }

    static String node(String t, String v) {
        return "{\"t\": \"" + t + "\", \"v\": " + v + "}";
    }

    // A value as the Java client hands it over: its Java class says its wire type.
    static String typed(Object value) {
        if (value instanceof Boolean) return node("t", value.toString());
        if (value instanceof Byte) return node("b", str(value.toString()));
        if (value instanceof Short) return node("s", str(value.toString()));
        if (value instanceof Integer) return node("I", str(value.toString()));
        if (value instanceof Long) return node("l", str(value.toString()));
        if (value instanceof Float)
            return node("f", str(String.format("%08x", Float.floatToRawIntBits((Float) value))));
        if (value instanceof Double)
            return node("d", str(String.format("%016x", Double.doubleToRawLongBits((Double) value))));
        if (value instanceof BigDecimal) {
            BigDecimal d = (BigDecimal) value;
            return node("D", "[" + d.scale() + ", " + str(d.unscaledValue().toString()) + "]");
        }
        if (value instanceof LongString) return node("S", str(hex(((LongString) value).getBytes())));
        if (value instanceof String)
            return node("S", str(hex(((String) value).getBytes(StandardCharsets.UTF_8))));
        if (value instanceof byte[]) return node("x", str(hex((byte[]) value)));
        if (value instanceof Date) return node("T", str(Long.toString(((Date) value).getTime() / 1000)));
        if (value instanceof Map) return node("F", table((Map<?, ?>) value));
        if (value instanceof List) {
            List<String> items = new ArrayList<>();
            for (Object item : (List<?>) value) items.add(typed(item));
            return node("A", "[" + String.join(", ", items) + "]");
        }
        if (value == null) return node("V", "null");
        throw new IllegalArgumentException("no wire type for " + value.getClass());
    }

    static String table(Map<?, ?> map) {
        List<String> items = new ArrayList<>();
        for (Map.Entry<?, ?> e : map.entrySet()) items.add(str(e.getKey().toString()) + ": " + typed(e.getValue()));
        return "{" + String.join(", ", items) + "}";
    }

    static Date ts(long seconds) {
        return new Date(seconds * 1000);
    }

    static Map<String, Object> headers() {
        Map<String, Object> h = new LinkedHashMap<>();
        h.put("bool_true", true);
        h.put("bool_false", false);
        h.put("byte_min", Byte.MIN_VALUE);
        h.put("byte_max", Byte.MAX_VALUE);
        h.put("short_min", Short.MIN_VALUE);
        h.put("short_max", Short.MAX_VALUE);
        h.put("int_min", Integer.MIN_VALUE);
        h.put("int_max", Integer.MAX_VALUE);
        h.put("int_1000", 1000);
        h.put("int_40000", 40000);
        h.put("long_min", Long.MIN_VALUE);
        h.put("long_max", Long.MAX_VALUE);
        h.put("long_5", 5L);
        h.put("float", 1.5f);
        h.put("float_max", Float.MAX_VALUE);
        h.put("float_tiny", Float.MIN_VALUE);
        h.put("double", 0.1);
        h.put("double_max", Double.MAX_VALUE);
        h.put("double_-0", -0.0);
        h.put("decimal", new BigDecimal("-123.45"));
        h.put("decimal_max", new BigDecimal(BigInteger.valueOf(Integer.MAX_VALUE), 255));
        h.put("decimal_min", new BigDecimal(Integer.MIN_VALUE));
        h.put("string", "héllo ✓");
        h.put("string_empty", "");
        h.put("string_not_utf8", LongStringHelper.asLongString(new byte[] {(byte) 0xe9, 't', (byte) 0xff}));
        h.put("bytes", new byte[] {0, 1, (byte) 255});
        h.put("bytes_empty", new byte[] {});
        h.put("ts_0", ts(0));
        h.put("ts_2**32-1", ts((1L << 32) - 1));
        h.put("ts_2**32", ts(1L << 32));
        h.put("ts_2200", ts(7258118400L));
        h.put("ts_9999", ts(253402300799L));
        h.put("ts_10000", ts(253402300800L));
        h.put("ts_-1", ts(-1));
        h.put("ts_year_0", ts(-62135596801L));
        h.put("ts_java_max", ts(Long.MAX_VALUE / 1000)); // a Date holds milliseconds in a long
        h.put("void", null);
        Map<String, Object> three = new LinkedHashMap<>();
        three.put("three", (short) 3);
        Map<String, Object> nested = new LinkedHashMap<>();
        nested.put("deeper", Arrays.asList(1L, "two", three));
        Map<String, Object> t = new LinkedHashMap<>();
        t.put("nested", nested);
        t.put("ts", ts(7258118400L));
        t.put("empty", new LinkedHashMap<String, Object>());
        h.put("table", t);
        Map<String, Object> k = new LinkedHashMap<>();
        k.put("k", (byte) 7);
        h.put("array", Arrays.asList((byte) 1, (short) 2, 3, 4L, 0.5f, 0.25, "s", new byte[] {1}, null, true,
                ts(253402300800L), new ArrayList<Object>(), k));
        return h;
    }

    static String describe(AMQP.BasicProperties p, byte[] body) {
        List<String> f = new ArrayList<>();
        f.add("\"content_type\": " + str(p.getContentType()));
        f.add("\"content_encoding\": " + str(p.getContentEncoding()));
        f.add("\"delivery_mode\": " + p.getDeliveryMode());
        f.add("\"priority\": " + p.getPriority());
        f.add("\"correlation_id\": " + str(p.getCorrelationId()));
        f.add("\"reply_to\": " + str(p.getReplyTo()));
        f.add("\"expiration\": " + str(p.getExpiration()));
        f.add("\"message_id\": " + str(p.getMessageId()));
        f.add("\"timestamp\": " + (p.getTimestamp() == null ? "null" : str(Long.toString(p.getTimestamp().getTime() / 1000))));
        f.add("\"message_type\": " + str(p.getType()));
        f.add("\"user_id\": " + str(p.getUserId()));
        f.add("\"app_id\": " + str(p.getAppId()));
        f.add("\"cluster_id\": " + str(p.getClusterId()));
        f.add("\"headers\": " + (p.getHeaders() == null ? "null" : table(p.getHeaders())));
        f.add("\"body\": " + str(hex(body)));
        return "{" + String.join(", ", f) + "}";
    }

    public static void main(String[] args) throws Exception {
        String mode = args[0], url = args[1], queue = args[2];
        ConnectionFactory factory = new ConnectionFactory();
        factory.setUri(url);
        List<String> out = new ArrayList<>();
        try (Connection conn = factory.newConnection()) {
            Channel ch = conn.createChannel();
            if (mode.equals("publish")) {
                ch.confirmSelect();
                byte[] body = "{\"from\": \"java\"}".getBytes(StandardCharsets.UTF_8);
                for (int i = 3; i < args.length; i++) {
                    AMQP.BasicProperties props = new AMQP.BasicProperties.Builder()
                            .contentType("application/json").contentEncoding("identity")
                            .headers(headers()).deliveryMode(1).priority(9)
                            .correlationId("corr-java").replyTo("reply-java").expiration("3600000")
                            .messageId(args[i]).timestamp(ts(7258118400L)).type("interop.test")
                            .userId("guest").appId("java-client").clusterId("cluster-java")
                            .build();
                    ch.basicPublish("", queue, true, props, body);
                    ch.waitForConfirmsOrDie(30000);
                    out.add(describe(props, body));
                }
            } else if (mode.equals("read")) {
                int want = Integer.parseInt(args[3]);
                long deadline = System.currentTimeMillis() + 30000;
                while (out.size() < want) {
                    GetResponse r = ch.basicGet(queue, true);
                    if (r == null) {
                        if (System.currentTimeMillis() > deadline)
                            throw new RuntimeException("only " + out.size() + " of " + want + " in " + queue);
                        Thread.sleep(50);
                        continue;
                    }
                    out.add(describe(r.getProps(), r.getBody()));
                }
            } else {
                throw new IllegalArgumentException("unknown mode " + mode);
            }
        }
        System.out.println("[" + String.join(", ", out) + "]");
    }
}
