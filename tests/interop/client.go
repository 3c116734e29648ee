// The Go side of tests/interop: amqp091-go (Debian's golang-github-rabbitmq-amqp091-go-dev),
// built in GOPATH mode by test_interop.py.
//
//	client publish URL QUEUE ID...   publish one message per ID (its message_id) with
//	                                 every field type Go can send; print what was sent
//	client read URL QUEUE N          basic.get N messages (waiting up to 30 s); print them
//
// Printed as JSON, each header value as {"t": wire type, "v": value} (see test_interop.py).
package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"strconv"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

func node(t string, v interface{}) map[string]interface{} {
	return map[string]interface{}{"t": t, "v": v}
}

// typed describes a value as amqp091-go hands it over: its Go type says its wire type.
func typed(value interface{}) map[string]interface{} {
	switch v := value.(type) {
	case bool:
		return node("t", v)
	case int8:
		return node("b", strconv.FormatInt(int64(v), 10))
	case byte:
		return node("B", strconv.FormatInt(int64(v), 10))
	case int16:
		return node("s", strconv.FormatInt(int64(v), 10))
	case int32:
		return node("I", strconv.FormatInt(int64(v), 10))
	case int64:
		return node("l", strconv.FormatInt(v, 10))
	case float32:
		return node("f", fmt.Sprintf("%08x", math.Float32bits(v)))
	case float64:
		return node("d", fmt.Sprintf("%016x", math.Float64bits(v)))
	case amqp.Decimal:
		return node("D", []interface{}{int(v.Scale), strconv.FormatInt(int64(v.Value), 10)})
	case string:
		return node("S", hex.EncodeToString([]byte(v)))
	case []byte:
		return node("x", hex.EncodeToString(v))
	case time.Time:
		return node("T", strconv.FormatInt(v.Unix(), 10))
	case amqp.Table:
		return node("F", table(v))
	case []interface{}:
		items := []interface{}{}
		for _, item := range v {
			items = append(items, typed(item))
		}
		return node("A", items)
	case nil:
		return node("V", nil)
	}
	panic(fmt.Sprintf("no wire type for %T", value))
}

func table(t amqp.Table) map[string]interface{} {
	out := map[string]interface{}{}
	for k, v := range t {
		out[k] = typed(v)
	}
	return out
}

func ts(sec int64) time.Time { return time.Unix(sec, 0) }

func headers() amqp.Table {
	return amqp.Table{
		"bool_true":       true,
		"bool_false":      false,
		"int8_min":        int8(math.MinInt8),
		"int8_max":        int8(math.MaxInt8),
		"uint8_max":       byte(255),
		"int16_min":       int16(math.MinInt16),
		"int16_max":       int16(math.MaxInt16),
		"int32_min":       int32(math.MinInt32),
		"int32_max":       int32(math.MaxInt32),
		"int32_1000":      int32(1000),
		"int32_40000":     int32(40000),
		"int64_min":       int64(math.MinInt64),
		"int64_max":       int64(math.MaxInt64),
		"int64_5":         int64(5),
		"float32":         float32(1.5),
		"float32_max":     float32(math.MaxFloat32),
		"float32_tiny":    float32(math.SmallestNonzeroFloat32),
		"float64":         0.1,
		"float64_max":     math.MaxFloat64,
		"float64_-0":      math.Copysign(0, -1),
		"decimal":         amqp.Decimal{Scale: 2, Value: -12345},
		"decimal_max":     amqp.Decimal{Scale: 255, Value: math.MaxInt32},
		"decimal_min":     amqp.Decimal{Scale: 0, Value: math.MinInt32},
		"string":          "héllo ✓",
		"string_empty":    "",
		"string_not_utf8": "\xe9t\xff",
		"bytes":           []byte{0, 1, 255},
		"bytes_empty":     []byte{},
		"ts_0":            ts(0),
		"ts_2**32-1":      ts(1<<32 - 1),
		"ts_2**32":        ts(1 << 32),
		"ts_2200":         ts(7258118400),
		"ts_9999":         ts(253402300799),
		"ts_10000":        ts(253402300800),
		"ts_-1":           ts(-1),
		"ts_year_0":       ts(-62135596801),
		"ts_int64_max":    ts(math.MaxInt64),
		"void":            nil,
		"table": amqp.Table{
			"nested": amqp.Table{"deeper": []interface{}{int64(1), "two", amqp.Table{"three": int16(3)}}},
			"ts":     ts(7258118400),
			"empty":  amqp.Table{},
		},
		"array": []interface{}{
			int8(1), int16(2), int32(3), int64(4), float32(0.5), 0.25, "s", []byte{1}, nil, true,
			ts(253402300800), []interface{}{}, amqp.Table{"k": byte(7)},
		},
	}
}

func properties(p amqp.Publishing, body []byte) map[string]interface{} {
	out := map[string]interface{}{
		"content_type": p.ContentType, "content_encoding": p.ContentEncoding,
		"delivery_mode": int(p.DeliveryMode), "priority": int(p.Priority),
		"correlation_id": p.CorrelationId, "reply_to": p.ReplyTo, "expiration": p.Expiration,
		"message_id": p.MessageId, "message_type": p.Type, "user_id": p.UserId, "app_id": p.AppId,
		"timestamp": nil, "headers": nil, "body": hex.EncodeToString(body),
	}
	if !p.Timestamp.IsZero() {
		out["timestamp"] = strconv.FormatInt(p.Timestamp.Unix(), 10)
	}
	if p.Headers != nil {
		out["headers"] = table(p.Headers)
	}
	// amqp091-go cannot tell an absent short string from an empty one
	for _, name := range []string{"content_type", "content_encoding", "correlation_id", "reply_to",
		"expiration", "message_id", "message_type", "user_id", "app_id"} {
		if out[name] == "" {
			out[name] = nil
		}
	}
	if out["delivery_mode"] == 0 {
		out["delivery_mode"] = nil
	}
	if out["priority"] == 0 {
		out["priority"] = nil
	}
	return out
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "go client:", err)
	os.Exit(1)
}

func main() {
	mode, url, queue := os.Args[1], os.Args[2], os.Args[3]
	conn, err := amqp.Dial(url)
	if err != nil {
		fail(err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		fail(err)
	}
	var out []interface{}
	switch mode {
	case "publish":
		if err := ch.Confirm(false); err != nil {
			fail(err)
		}
		// Confirms through NotifyPublish, in publish order: the deferred confirmations
		// of Debian's amqp091-go 1.5 reported an ack as a failure once under load.
		confirms := ch.NotifyPublish(make(chan amqp.Confirmation, len(os.Args[4:])))
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		for _, id := range os.Args[4:] {
			msg := amqp.Publishing{
				Headers: headers(), ContentType: "application/json", ContentEncoding: "identity",
				DeliveryMode: 1, Priority: 9, CorrelationId: "corr-go", ReplyTo: "reply-go",
				Expiration: "3600000", MessageId: id, Timestamp: ts(7258118400),
				Type: "interop.test", UserId: "guest", AppId: "go-client",
				Body: []byte(`{"from": "go"}`),
			}
			if err := ch.PublishWithContext(ctx, "", queue, true, false, msg); err != nil {
				fail(err)
			}
			select {
			case confirm, open := <-confirms:
				if !open {
					fail(fmt.Errorf("publish %s not confirmed: the channel closed", id))
				}
				if !confirm.Ack {
					fail(fmt.Errorf("publish %s nacked by the broker (tag %d)", id, confirm.DeliveryTag))
				}
			case <-ctx.Done():
				fail(fmt.Errorf("publish %s not confirmed within 30 s", id))
			}
			out = append(out, properties(msg, msg.Body))
		}
	case "read":
		want, _ := strconv.Atoi(os.Args[4])
		deadline := time.Now().Add(30 * time.Second)
		for len(out) < want {
			d, ok, err := ch.Get(queue, true)
			if err != nil {
				fail(err)
			}
			if !ok {
				if time.Now().After(deadline) {
					fail(fmt.Errorf("only %d of %d messages in %s", len(out), want, queue))
				}
				time.Sleep(50 * time.Millisecond)
				continue
			}
			out = append(out, properties(amqp.Publishing{
				Headers: d.Headers, ContentType: d.ContentType, ContentEncoding: d.ContentEncoding,
				DeliveryMode: d.DeliveryMode, Priority: d.Priority, CorrelationId: d.CorrelationId,
				ReplyTo: d.ReplyTo, Expiration: d.Expiration, MessageId: d.MessageId,
				Timestamp: d.Timestamp, Type: d.Type, UserId: d.UserId, AppId: d.AppId,
			}, d.Body))
		}
	default:
		fail(fmt.Errorf("unknown mode %q", mode))
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fail(err)
	}
}
