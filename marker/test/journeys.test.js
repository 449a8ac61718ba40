import { describe, expect, test } from "vitest";

import { MAX_KEPT_JOURNEYS, journeysReducer, markProgress, recentJourneys, waterfall } from "../src/journeys.js";

const T0 = 1_700_000_000_000; // ms
const ns = (ms) => ms * 1e6;

function hop(name, hopName, service, startMs, ms, extra = {}) {
  return {
    hop: hopName,
    name,
    service,
    span_id: name,
    start_ns: ns(startMs),
    end_ns: ns(startMs + ms),
    duration_ms: ms,
    status: "UNSET",
    error: null,
    fsynced: false,
    ...extra,
  };
}

function journey(traceId, hops, extra = {}) {
  return { trace_id: traceId, state: "published", failed: false, error: null, hops, total_ms: null, start_ns: hops[0]?.start_ns ?? 0, spans: [], ...extra };
}

const published = { status: "published", createdAt: new Date(T0), publishedAt: new Date(T0 + 5) };

describe("journeysReducer", () => {
  test("merges a loaded list and pushed updates by trace id", () => {
    let state = journeysReducer(new Map(), { type: "loaded", journeys: [journey("a", []), journey("b", [])] });
    state = journeysReducer(state, { type: "updated", journey: journey("a", [], { state: "persisted" }) });
    expect([state.size, state.get("a").state]).toEqual([2, "persisted"]);
  });

  test("keeps only the newest MAX_KEPT_JOURNEYS", () => {
    const many = Array.from({ length: MAX_KEPT_JOURNEYS + 5 }, (_, i) => ({ ...journey(`t${i}`, []), start_ns: i }));
    const state = journeysReducer(new Map(), { type: "loaded", journeys: many });
    expect([state.size, state.has("t0"), state.has(`t${MAX_KEPT_JOURNEYS + 4}`)]).toEqual([MAX_KEPT_JOURNEYS, false, true]);
  });

  test("ignores a journey without a trace id", () => {
    expect(journeysReducer(new Map(), { type: "updated", journey: { state: "x" } }).size).toBe(0);
  });
});

describe("recentJourneys", () => {
  test("newest first, and failed only on request", () => {
    const state = new Map([
      ["a", { ...journey("a", []), start_ns: 1 }],
      ["b", { ...journey("b", []), start_ns: 2, failed: true }],
      ["c", { ...journey("c", []), start_ns: 3, state: "dead-lettered", failed: true }],
    ]);
    expect([
      recentJourneys(state).map((j) => j.trace_id),
      recentJourneys(state, { failedOnly: true }).map((j) => j.trace_id),
    ]).toEqual([
      ["c", "b", "a"],
      ["c", "b"],
    ]);
  });
});

describe("markProgress", () => {
  test("a persisted mark shows three hops and the total", () => {
    const j = journey(
      "a",
      [
        hop("publish-message", "published", "react-web-app", T0, 4),
        hop("process-message", "processed", "processor", T0 + 6, 2),
        hop("persist-message", "persisted", "persister", T0 + 9, 3, { fsynced: true }),
      ],
      { state: "persisted", total_ms: 12 },
    );
    const p = markProgress(published, j, T0 + 100, 10);
    expect([p.steps.map((s) => `${s.hop}:${s.ms}`), p.totalMs, p.waiting, p.error]).toEqual([
      ["published:4", "processed:2", "persisted:3"],
      12,
      null,
      null,
    ]);
  });

  test("a failed hop carries its error", () => {
    const error = "persist-message: ENOSPC: No space left on device";
    const j = journey(
      "a",
      [hop("persist-message", "persisted", "persister", T0, 3, { status: "ERROR", error })],
      { state: "failed", failed: true, error },
    );
    const p = markProgress(published, j, T0 + 100_000, 10);
    expect([p.steps[0].failed, p.error, p.waiting]).toEqual([true, error, null]);
  });

  test("no span from the processor after stallS", () => {
    const j = journey("a", [hop("publish-message", "published", "react-web-app", T0, 4)]);
    expect([markProgress(published, j, T0 + 9_000, 10).waiting, markProgress(published, j, T0 + 12_500, 10).waiting]).toEqual([
      null,
      "no span from processor for 12 s",
    ]);
  });

  test("no span from the persister once processed", () => {
    const j = journey("a", [
      hop("publish-message", "published", "react-web-app", T0, 4),
      hop("process-message", "processed", "processor", T0 + 5, 5),
    ]);
    expect(markProgress(published, j, T0 + 30_010, 10).waiting).toBe("no span from persister for 30 s");
  });

  test("a mark with no journey yet counts from its publish", () => {
    expect(markProgress(published, undefined, T0 + 20_005, 10).waiting).toBe("no span from processor for 20 s");
  });

  test("a mark that failed to publish never waits", () => {
    expect(markProgress({ ...published, status: "failed" }, undefined, T0 + 60_000, 10).waiting).toBe(null);
  });
});

describe("waterfall", () => {
  test("offsets and widths are fractions of the trace", () => {
    const spans = [
      { span_id: "a", start_ns: ns(0), end_ns: ns(10) },
      { span_id: "b", start_ns: ns(5), end_ns: ns(7.5) },
    ];
    const { totalMs, bars } = waterfall(spans);
    expect([totalMs, bars.map((b) => [b.offset, b.width])]).toEqual([
      10,
      [
        [0, 1],
        [0.5, 0.25],
      ],
    ]);
  });
});
