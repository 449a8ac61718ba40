import { readFileSync } from "node:fs";

import { describe, expect, test } from "vitest";

import { CorrelationIdError, decodeCorrelationId, encodeCorrelationId } from "../src/correlation.js";

// The same golden vectors the Python codec is tested against.
const vectors = JSON.parse(
  readFileSync(new URL("../../tests/data/correlation_vectors.json", import.meta.url), "utf-8"),
);

const hex2 = (n) => n.toString(16).padStart(2, "0");

function reasonOf(input) {
  try {
    decodeCorrelationId(input);
  } catch (error) {
    return error instanceof CorrelationIdError ? error.reason : `unexpected ${error}`;
  }
  return "accepted";
}

describe("golden vectors", () => {
  test("the vector file has valid and invalid cases", () => {
    expect([true, true]).toEqual([vectors.valid.length > 0, vectors.invalid.length > 0]);
  });

  test.each(vectors.valid)("decodes $description", (vector) => {
    const decoded = decodeCorrelationId(vector.input);
    expect({
      version: vector.version,
      trace_id: vector.trace_id,
      span_id: vector.span_id,
      flags: vector.flags,
    }).toEqual({
      version: hex2(decoded.version),
      trace_id: decoded.traceId,
      span_id: decoded.spanId,
      flags: hex2(decoded.traceFlags),
    });
  });

  test.each(vectors.valid)("encodes $description", (vector) => {
    expect(vector.correlation_id).toBe(
      encodeCorrelationId({
        version: Number.parseInt(vector.version, 16),
        traceId: vector.trace_id,
        spanId: vector.span_id,
        traceFlags: Number.parseInt(vector.flags, 16),
      }),
    );
  });

  test.each(vectors.valid)("gives the dashed traceparent of $description", (vector) => {
    expect(vector.traceparent).toBe(decodeCorrelationId(vector.input).traceparent);
  });

  test.each(vectors.invalid)("rejects $description as $reason", (vector) => {
    expect(vector.reason).toBe(reasonOf(vector.input));
  });
});

describe("encodeCorrelationId", () => {
  test("encodes an OpenTelemetry span context as version 00", () => {
    const id = encodeCorrelationId({ traceId: "a".repeat(32), spanId: "b".repeat(16), traceFlags: 1 });
    expect(`00${"a".repeat(32)}${"b".repeat(16)}01`).toBe(id);
  });

  test("rejects an all-zero span id", () => {
    expect(() => encodeCorrelationId({ traceId: "a".repeat(32), spanId: "0".repeat(16), traceFlags: 1 })).toThrow(
      CorrelationIdError,
    );
  });

  test("rejects a short trace id", () => {
    expect(() => encodeCorrelationId({ traceId: "abc", spanId: "b".repeat(16), traceFlags: 1 })).toThrow(
      CorrelationIdError,
    );
  });

  test("rejects flags above 255", () => {
    expect(() => encodeCorrelationId({ traceId: "a".repeat(32), spanId: "b".repeat(16), traceFlags: 256 })).toThrow(
      CorrelationIdError,
    );
  });
});

describe("decodeCorrelationId", () => {
  test("rejects a non-string", () => {
    expect("not_a_string").toBe(reasonOf(42));
  });

  test("round-trips random contexts", () => {
    for (let i = 0; i < 200; i += 1) {
      const hex = (n) => Array.from({ length: n }, () => "0123456789abcdef"[Math.floor(Math.random() * 16)]).join("");
      const context = { traceId: `1${hex(31)}`, spanId: `1${hex(15)}`, traceFlags: Math.floor(Math.random() * 256) };
      const decoded = decodeCorrelationId(encodeCorrelationId(context));
      expect(context).toEqual({ traceId: decoded.traceId, spanId: decoded.spanId, traceFlags: decoded.traceFlags });
    }
  });
});
