import { describe, expect, test } from "vitest";

import {
  MAX_BURST,
  MAX_LISTED_MARKS,
  ampsUrl,
  buildMark,
  burstTexts,
  marksReducer,
  publishAttributes,
  traceUrl,
  uuid4,
} from "../src/marks.js";

describe("uuid4", () => {
  test("formats 16 random bytes as a version 4 UUID", () => {
    const fill = (bytes) => bytes.fill(0xff);
    expect("ffffffff-ffff-4fff-bfff-ffffffffffff").toBe(uuid4(fill));
  });
});

describe("buildMark", () => {
  const fields = {
    id: "6f1d2c1e-8a4b-4a43-9a55-0f0e7f3f3a11",
    text: "héllo",
    createdAt: new Date(Date.UTC(2026, 0, 2, 3, 4, 5, 678)),
    correlationId: `00${"a".repeat(32)}${"b".repeat(16)}01`,
  };

  test("has exactly id, text, created_at and CorrelationId", () => {
    expect({
      id: fields.id,
      text: "héllo",
      created_at: "2026-01-02T03:04:05.678Z",
      CorrelationId: fields.correlationId,
    }).toEqual(JSON.parse(buildMark(fields).body));
  });

  test("counts the body size in UTF-8 bytes", () => {
    const { body, bodySize } = buildMark(fields);
    expect(body.length + 1).toBe(bodySize);
  });
});

describe("publishAttributes", () => {
  test("uses the messaging semantic-convention names", () => {
    expect({
      "messaging.system": "amps",
      "messaging.destination.name": "internal",
      "messaging.operation.type": "send",
      "messaging.operation.name": "publish",
      "messaging.message.id": "m1",
      "messaging.message.body.size": 12,
    }).toEqual(publishAttributes({ topic: "internal", messageId: "m1", bodySize: 12 }));
  });
});

describe("burstTexts", () => {
  test("numbers each mark of a burst", () => {
    expect(["x (1/3)", "x (2/3)", "x (3/3)"]).toEqual(burstTexts("x", 3));
  });

  test("keeps a single mark's text as it is", () => {
    expect(["x"]).toEqual(burstTexts("x", 1));
  });

  test("rejects a burst above the maximum", () => {
    expect(() => burstTexts("x", MAX_BURST + 1)).toThrow(RangeError);
  });
});

describe("marksReducer", () => {
  const mark = (id) => ({ id, status: "sending", reason: null });

  test("puts a new mark first", () => {
    expect(["b", "a"]).toEqual(marksReducer([mark("a")], { type: "added", mark: mark("b") }).map((m) => m.id));
  });

  test("keeps at most MAX_LISTED_MARKS marks", () => {
    const full = Array.from({ length: MAX_LISTED_MARKS }, (_, i) => mark(String(i)));
    expect(MAX_LISTED_MARKS).toBe(marksReducer(full, { type: "added", mark: mark("new") }).length);
  });

  test("records a failure with its reason", () => {
    const after = marksReducer([mark("a"), mark("b")], { type: "settled", id: "b", status: "failed", reason: "down" });
    expect([mark("a"), { id: "b", status: "failed", reason: "down" }]).toEqual(after);
  });
});

describe("traceUrl", () => {
  test("links to the Jaeger UI trace page", () => {
    expect("http://jaeger:16686/trace/abc").toBe(traceUrl("http://jaeger:16686/", "abc"));
  });

  test("is null without a Jaeger UI", () => {
    expect(null).toBe(traceUrl(null, "abc"));
  });
});

describe("ampsUrl", () => {
  test("defaults to the same-origin proxy", () => {
    expect("ws://127.0.0.1:8080/amps/json").toBe(ampsUrl(null, { protocol: "http:", host: "127.0.0.1:8080" }));
  });

  test("uses wss on an https page", () => {
    expect("wss://marker.example/amps/json").toBe(ampsUrl(null, { protocol: "https:", host: "marker.example" }));
  });

  test("prefers the configured URL", () => {
    expect("ws://broker:9008/amps/json").toBe(ampsUrl("ws://broker:9008/amps/json", { protocol: "http:", host: "x" }));
  });
});
