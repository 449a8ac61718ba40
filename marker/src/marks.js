// Pure helpers for marks: building the published message, the span
// attributes that describe it, and the list the page shows.

/** Most marks kept in the on-page list; older ones scroll out. */
export const MAX_LISTED_MARKS = 500;

/** Largest burst the page sends in one go. */
export const MAX_BURST = 1000;

/**
 * A random (version 4) UUID from the given random source.
 *
 * `crypto.randomUUID` exists only in secure contexts, and the page may be
 * served over plain http on a LAN address, so build it from getRandomValues.
 *
 * @param {(bytes: Uint8Array) => Uint8Array} fillRandom
 * @returns {string}
 */
export function uuid4(fillRandom) {
  const bytes = fillRandom(new Uint8Array(16));
  bytes[6] = (bytes[6] & 0x0f) | 0x40;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/**
 * The message published to AMPS for one mark.
 *
 * @param {{id: string, text: string, createdAt: Date, correlationId: string}} fields
 * @returns {{mark: object, body: string, bodySize: number}}
 */
export function buildMark({ id, text, createdAt, correlationId }) {
  const mark = { id, text, created_at: createdAt.toISOString(), CorrelationId: correlationId };
  const body = JSON.stringify(mark);
  return { mark, body, bodySize: new TextEncoder().encode(body).length };
}

/**
 * OpenTelemetry messaging attributes (semantic conventions v1.44) of a publish.
 *
 * The names are written out rather than imported from the incubating entry
 * point of @opentelemetry/semantic-conventions, as that package advises.
 */
export function publishAttributes({ topic, messageId, bodySize }) {
  return {
    "messaging.system": "amps",
    "messaging.destination.name": topic,
    "messaging.operation.type": "send",
    "messaging.operation.name": "publish",
    "messaging.message.id": messageId,
    "messaging.message.body.size": bodySize,
  };
}

/** Texts for a burst of `count` marks: "text (i/count)". */
export function burstTexts(text, count) {
  if (!Number.isInteger(count) || count < 1 || count > MAX_BURST) {
    throw new RangeError(`burst size must be an integer from 1 to ${MAX_BURST}`);
  }
  if (count === 1) {
    return [text];
  }
  return Array.from({ length: count }, (_, i) => `${text} (${i + 1}/${count})`);
}

/**
 * The marks list after an event: "added" puts a mark first, "settled"
 * updates a mark's status (published, or failed with a reason).
 */
export function marksReducer(marks, event) {
  switch (event.type) {
    case "added":
      return [event.mark, ...marks].slice(0, MAX_LISTED_MARKS);
    case "settled":
      return marks.map((m) =>
        m.id === event.id
          ? { ...m, status: event.status, reason: event.reason ?? null, ...(event.at ? { publishedAt: event.at } : {}) }
          : m,
      );
    default:
      throw new Error(`unknown marks event ${event.type}`);
  }
}

/** The Jaeger UI address of a trace, or null when no UI is configured. */
export function traceUrl(jaegerUiUrl, traceId) {
  if (!jaegerUiUrl) {
    return null;
  }
  return `${jaegerUiUrl.replace(/\/+$/, "")}/trace/${traceId}`;
}

/** The AMPS WebSocket URL: the configured one, else the same-origin proxy. */
export function ampsUrl(configured, location) {
  if (configured) {
    return configured;
  }
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/amps/json`;
}
