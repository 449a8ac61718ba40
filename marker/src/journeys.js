// Pure helpers for journeys: the marker server's view of each trace (see
// ampsflow/core/journeys.py), kept in a bounded map and turned into what a
// mark's row and the waterfall show.

/** Most journeys the page keeps (the server holds many more). */
export const MAX_KEPT_JOURNEYS = 1000;

/** The hops of a mark, in order, and the service each is expected from. */
export const HOP_ORDER = [
  { hop: "published", name: "publish-message", service: "marker page" },
  { hop: "processed", name: "process-message", service: "processor" },
  { hop: "persisted", name: "persist-message", service: "persister" },
];

/**
 * The journeys map after an event: "loaded" merges a list from
 * GET /api/journeys, "updated" merges one pushed journey. Newest first by
 * start time; at most MAX_KEPT_JOURNEYS are kept.
 *
 * @param {Map<string, object>} journeys
 */
export function journeysReducer(journeys, event) {
  let incoming;
  switch (event.type) {
    case "loaded":
      incoming = event.journeys;
      break;
    case "updated":
      incoming = [event.journey];
      break;
    default:
      throw new Error(`unknown journeys event ${event.type}`);
  }
  const next = new Map(journeys);
  for (const journey of incoming) {
    if (journey && typeof journey.trace_id === "string" && journey.trace_id) {
      next.set(journey.trace_id, journey);
    }
  }
  if (next.size <= MAX_KEPT_JOURNEYS) {
    return next;
  }
  const newest = [...next.values()].sort((a, b) => b.start_ns - a.start_ns).slice(0, MAX_KEPT_JOURNEYS);
  return new Map(newest.map((j) => [j.trace_id, j]));
}

/** Newest-first list of journeys, optionally only the failed ones. */
export function recentJourneys(journeys, { failedOnly = false, limit = 200 } = {}) {
  return [...journeys.values()]
    .filter((j) => !failedOnly || j.failed || j.state === "dead-lettered")
    .sort((a, b) => b.start_ns - a.start_ns)
    .slice(0, limit);
}

function formatMs(ms) {
  if (ms === null || ms === undefined) {
    return "";
  }
  return ms >= 100 ? `${Math.round(ms)} ms` : `${Number(ms.toFixed(1))} ms`;
}

export { formatMs };

/**
 * What a mark's row shows: one step per hop seen (with its service, time and
 * error), the total latency, and, when the next hop has not reported within
 * `stallS` seconds of the last one, a "no span from <service> for N s" note.
 *
 * @param {{status: string, createdAt: Date}} mark the page's own record
 * @param {object | undefined} journey the server's journey for the mark's trace
 * @param {number} now milliseconds since the epoch
 * @param {number} stallS
 */
export function markProgress(mark, journey, now, stallS) {
  const hops = journey ? journey.hops : [];
  const steps = hops.map((h) => ({
    hop: h.hop,
    service: h.service,
    ms: h.duration_ms,
    failed: h.status === "ERROR",
    error: h.error,
    fsynced: h.fsynced,
  }));
  const failed = Boolean(journey && (journey.failed || journey.state === "dead-lettered"));
  let waiting = null;
  if (!failed && mark.status === "published" && journey?.state !== "persisted") {
    const seen = new Set(hops.map((h) => h.hop));
    const next = HOP_ORDER.find((h) => h.hop !== "published" && !seen.has(h.hop));
    if (next) {
      const lastEndNs = hops.length ? Math.max(...hops.map((h) => h.end_ns)) : null;
      const since = lastEndNs !== null ? lastEndNs / 1e6 : (mark.publishedAt ?? mark.createdAt).getTime();
      const seconds = Math.floor((now - since) / 1000);
      if (seconds >= stallS) {
        waiting = `no span from ${next.service} for ${seconds} s`;
      }
    }
  }
  return {
    state: journey ? journey.state : null,
    steps,
    totalMs: journey && journey.state === "persisted" ? journey.total_ms : null,
    error: failed ? journey.error : null,
    waiting,
  };
}

/**
 * Bars of a waterfall: each span's offset and width as fractions of the
 * trace's whole duration (first start to last end).
 */
export function waterfall(spans) {
  if (!spans || spans.length === 0) {
    return { totalMs: 0, bars: [] };
  }
  const start = Math.min(...spans.map((s) => s.start_ns));
  const end = Math.max(...spans.map((s) => s.end_ns));
  const total = Math.max(1, end - start);
  return {
    totalMs: (end - start) / 1e6,
    bars: spans.map((s) => ({
      span: s,
      offset: (s.start_ns - start) / total,
      width: Math.max(0.004, (s.end_ns - s.start_ns) / total),
      startMs: (s.start_ns - start) / 1e6,
    })),
  };
}
