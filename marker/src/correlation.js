// The CorrelationId codec: the W3C traceparent without its dashes.
//
// AMPS allows only base64-alphabet characters in the CorrelationId header, and
// a traceparent contains dashes, so the wire form is
// version(2 hex) trace-id(32 hex) span-id(16 hex) flags(2 hex) = 52 lowercase
// hex characters. Decoding also accepts upper case and the dashed 55-character
// traceparent. The rules and the failure reasons are those of the Python codec
// (ampsflow/core/codec.py); both pass tests/data/correlation_vectors.json.

export const CORRELATION_ID_LENGTH = 52;
export const TRACEPARENT_LENGTH = 55;

const HEX = /^[0-9a-f]*$/;

/**
 * Raised when a value is not a usable CorrelationId. `reason` is one of
 * empty, wrong_length, bad_separator, not_hex, version_ff, zero_trace_id,
 * zero_span_id, not_a_string, out_of_range.
 */
export class CorrelationIdError extends Error {
  constructor(reason, detail) {
    super(`${reason}: ${detail}`);
    this.name = "CorrelationIdError";
    this.reason = reason;
  }
}

function hexField(value, width, name) {
  if (typeof value !== "string" || value.length !== width || !HEX.test(value.toLowerCase())) {
    throw new CorrelationIdError("out_of_range", `${name} must be ${width} hex characters`);
  }
  return value.toLowerCase();
}

function byteField(value, name) {
  if (!Number.isInteger(value) || value < 0 || value > 0xff) {
    throw new CorrelationIdError("out_of_range", `${name} must be an integer 0..255, got ${value}`);
  }
  return value.toString(16).padStart(2, "0");
}

/**
 * Encode a trace context as a 52-character lowercase hex CorrelationId.
 *
 * @param {{traceId: string, spanId: string, traceFlags: number, version?: number}} context
 *   an OpenTelemetry SpanContext fits as it is (version defaults to 0)
 * @returns {string}
 * @throws {CorrelationIdError} reason out_of_range, zero_trace_id, zero_span_id or version_ff
 */
export function encodeCorrelationId({ traceId, spanId, traceFlags, version = 0 }) {
  const versionHex = byteField(version, "version");
  if (versionHex === "ff") {
    throw new CorrelationIdError("version_ff", "version ff is forbidden by W3C trace context");
  }
  const trace = hexField(traceId, 32, "trace id");
  const span = hexField(spanId, 16, "span id");
  if (/^0+$/.test(trace)) {
    throw new CorrelationIdError("zero_trace_id", "the trace id is all zeros");
  }
  if (/^0+$/.test(span)) {
    throw new CorrelationIdError("zero_span_id", "the span id is all zeros");
  }
  return `${versionHex}${trace}${span}${byteField(traceFlags, "flags")}`;
}

/**
 * Decode a CorrelationId (52 hex, any case) or a dashed traceparent.
 *
 * @param {string} value
 * @returns {{version: number, traceId: string, spanId: string, traceFlags: number, traceparent: string}}
 *   ids in lowercase hex, as OpenTelemetry JS expects them
 * @throws {CorrelationIdError} with `reason` saying why
 */
export function decodeCorrelationId(value) {
  if (typeof value !== "string") {
    throw new CorrelationIdError("not_a_string", `got ${typeof value}`);
  }
  if (value === "") {
    throw new CorrelationIdError("empty", "no value");
  }
  let compact;
  if (value.length === TRACEPARENT_LENGTH) {
    const parts = value.split("-");
    if (parts.length !== 4 || parts.map((p) => p.length).join(",") !== "2,32,16,2") {
      throw new CorrelationIdError("bad_separator", "dashed form must be VV-TRACEID(32)-SPANID(16)-FF");
    }
    compact = parts.join("");
  } else if (value.length === CORRELATION_ID_LENGTH) {
    compact = value;
  } else {
    throw new CorrelationIdError(
      "wrong_length",
      `got ${value.length} characters (expected ${CORRELATION_ID_LENGTH}, or ${TRACEPARENT_LENGTH} with dashes)`,
    );
  }
  compact = compact.toLowerCase();
  if (!HEX.test(compact)) {
    throw new CorrelationIdError("not_hex", "only 0-9 a-f A-F are allowed");
  }
  const version = compact.slice(0, 2);
  const traceId = compact.slice(2, 34);
  const spanId = compact.slice(34, 50);
  const flags = compact.slice(50, 52);
  if (version === "ff") {
    throw new CorrelationIdError("version_ff", "version ff is forbidden by W3C trace context");
  }
  if (/^0+$/.test(traceId)) {
    throw new CorrelationIdError("zero_trace_id", "the trace id is all zeros");
  }
  if (/^0+$/.test(spanId)) {
    throw new CorrelationIdError("zero_span_id", "the span id is all zeros");
  }
  return {
    version: Number.parseInt(version, 16),
    traceId,
    spanId,
    traceFlags: Number.parseInt(flags, 16),
    traceparent: `${version}-${traceId}-${spanId}-${flags}`,
  };
}
