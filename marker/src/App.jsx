import { useCallback, useEffect, useMemo, useReducer, useRef, useState } from "react";

import { AmpsConnection, State } from "./connection.js";
import { encodeCorrelationId } from "./correlation.js";
import {
  MAX_BURST,
  ampsUrl,
  buildMark,
  burstTexts,
  marksReducer,
  publishAttributes,
  traceUrl,
  uuid4,
} from "./marks.js";
import { createTracing, recordPublishFailure, startPublishSpan } from "./tracing.js";
import { formatMs, journeysReducer, markProgress, recentJourneys, waterfall } from "./journeys.js";

const fillRandom = (bytes) => crypto.getRandomValues(bytes);

function formatTime(date) {
  return date.toLocaleTimeString(undefined, { hour12: false }) + `.${String(date.getMilliseconds()).padStart(3, "0")}`;
}

function useNow(active) {
  const [now, setNow] = useState(() => Date.now());
  useEffect(() => {
    if (!active) {
      return undefined;
    }
    const timer = setInterval(() => setNow(Date.now()), 500);
    return () => clearInterval(timer);
  }, [active]);
  return now;
}

function ConnectionBadge({ state, url }) {
  const now = useNow(state.retryAt !== null);
  let label;
  if (state.status === State.CONNECTED) {
    label = "Connected to AMPS";
  } else if (state.status === State.CONNECTING) {
    label = "Connecting to AMPS…";
  } else {
    const seconds = state.retryAt === null ? null : Math.max(0, Math.ceil((state.retryAt - now) / 1000));
    label = seconds === null ? "Disconnected" : `Disconnected, retrying in ${seconds} s`;
  }
  return (
    <div
      className={`connection connection-${state.status}`}
      id="connection"
      data-state={state.status}
      title={url}
      role="status"
      aria-live="polite"
    >
      <span className="dot" aria-hidden="true" />
      <span className="connection-label">{label}</span>
      {state.status === State.DISCONNECTED && state.reason ? (
        <span className="connection-reason" id="connection-reason">
          · {state.reason}
        </span>
      ) : null}
    </div>
  );
}

function StatusCell({ mark }) {
  return (
    <td className={`status status-${mark.status}`} data-status={mark.status}>
      <span className="status-label">{mark.status}</span>
      {mark.reason ? <span className="status-reason">{mark.reason}</span> : null}
    </td>
  );
}

function JourneyCell({ progress }) {
  return (
    <td className="journey" data-journey-state={progress.state ?? "none"}>
      <ol className="hops">
        {progress.steps.map((step) => (
          <li
            key={`${step.hop}-${step.service}`}
            className={`hop ${step.failed ? "hop-failed" : "hop-ok"}`}
            data-hop={step.hop}
            data-failed={step.failed ? "true" : "false"}
          >
            <span className="hop-name">{step.failed ? `${step.hop} failed` : step.hop}</span>
            <span className="hop-detail">
              {step.service}
              {step.hop === "persisted" && step.fsynced ? ", fsync'd" : ""}, {formatMs(step.ms)}
            </span>
          </li>
        ))}
      </ol>
      {progress.totalMs !== null ? (
        <span className="journey-total" data-total-ms={progress.totalMs}>
          total {formatMs(progress.totalMs)} end to end
        </span>
      ) : null}
      {progress.error ? <span className="journey-error">{progress.error}</span> : null}
      {progress.waiting ? <span className="journey-waiting">{progress.waiting}</span> : null}
    </td>
  );
}

function Waterfall({ journey }) {
  if (!journey) {
    return <p className="empty">No spans of this trace have reached the marker yet.</p>;
  }
  const { totalMs, bars } = waterfall(journey.spans);
  return (
    <div className="waterfall" data-trace-id={journey.trace_id}>
      <p className="waterfall-head">
        {bars.length} spans over {formatMs(totalMs)}
      </p>
      {bars.map(({ span, offset, width, startMs }) => (
        <div className={`wf-row ${span.status === "ERROR" ? "wf-failed" : ""}`} key={span.span_id} data-span-name={span.name}>
          <div className="wf-label">
            <span className="wf-name">{span.name}</span>
            <span className="wf-service">{span.service}</span>
          </div>
          <div className="wf-track">
            <div className="wf-bar" style={{ marginLeft: `${offset * 100}%`, width: `${width * 100}%` }} />
          </div>
          <div className="wf-time">
            +{formatMs(startMs)} · {formatMs(span.duration_ms)}
          </div>
          <details className="wf-attrs">
            <summary>attributes</summary>
            <dl>
              {span.status !== "UNSET" ? (
                <div>
                  <dt>status</dt>
                  <dd>
                    {span.status}
                    {span.status_message ? `: ${span.status_message}` : ""}
                  </dd>
                </div>
              ) : null}
              {Object.entries(span.attributes).map(([key, value]) => (
                <div key={key}>
                  <dt>{key}</dt>
                  <dd>{String(value)}</dd>
                </div>
              ))}
              {span.events.length ? (
                <div>
                  <dt>events</dt>
                  <dd>{span.events.join(", ")}</dd>
                </div>
              ) : null}
            </dl>
          </details>
        </div>
      ))}
    </div>
  );
}

function MarkRow({ mark, journey, jaegerUiUrl, now, stallS, expanded, onToggle }) {
  const link = traceUrl(jaegerUiUrl, mark.traceId);
  const progress = markProgress(mark, journey, now, stallS);
  return (
    <>
      <tr
        className={`mark ${progress.error ? "mark-failed" : ""}`}
        data-mark-id={mark.id}
        data-trace-id={mark.traceId}
        onClick={onToggle}
        aria-expanded={expanded}
      >
        <td className="time">{formatTime(mark.createdAt)}</td>
        <td className="text">{mark.text}</td>
        <td className="mono message-id">{mark.id}</td>
        <td className="mono trace-id">{mark.traceId}</td>
        <StatusCell mark={mark} />
        <JourneyCell progress={progress} />
        <td className="trace-link">
          {link ? (
            <a href={link} target="_blank" rel="noopener noreferrer" onClick={(e) => e.stopPropagation()}>
              open trace
            </a>
          ) : null}
        </td>
      </tr>
      {expanded ? (
        <tr className="mark-detail">
          <td colSpan={7}>
            <Waterfall journey={journey} />
          </td>
        </tr>
      ) : null}
    </>
  );
}

function RecentJourneys({ journeys }) {
  const [failedOnly, setFailedOnly] = useState(false);
  const [open, setOpen] = useState(null);
  const list = recentJourneys(journeys, { failedOnly });
  return (
    <section className="panel" id="recent-journeys">
      <div className="list-header">
        <h2>Recent journeys</h2>
        <label className="filter">
          <input
            id="failed-only"
            type="checkbox"
            checked={failedOnly}
            onChange={(e) => setFailedOnly(e.target.checked)}
          />
          failed only
        </label>
      </div>
      {list.length === 0 ? (
        <p className="empty">{failedOnly ? "No failed journeys." : "No journeys seen by the marker yet."}</p>
      ) : (
        <div className="table-wrap">
          <table id="journeys">
            <thead>
              <tr>
                <th>Start</th>
                <th>Message id</th>
                <th>Trace id</th>
                <th>State</th>
                <th>Hops</th>
              </tr>
            </thead>
            <tbody>
              {list.map((j) => (
                <JourneyRow
                  key={j.trace_id}
                  journey={j}
                  expanded={open === j.trace_id}
                  onToggle={() => setOpen(open === j.trace_id ? null : j.trace_id)}
                />
              ))}
            </tbody>
          </table>
        </div>
      )}
    </section>
  );
}

function JourneyRow({ journey, expanded, onToggle }) {
  const failed = journey.failed || journey.state === "dead-lettered";
  return (
    <>
      <tr
        className={`journey-row ${failed ? "journey-failed" : ""}`}
        data-trace-id={journey.trace_id}
        data-state={journey.state}
        onClick={onToggle}
        aria-expanded={expanded}
      >
        <td className="time">{journey.start_ns ? formatTime(new Date(journey.start_ns / 1e6)) : ""}</td>
        <td className="mono">{journey.message_id ?? ""}</td>
        <td className="mono">{journey.trace_id}</td>
        <td className={`journey-state state-${journey.state}`}>
          <span className="status-label">{journey.state}</span>
          {journey.error ? <span className="journey-error">{journey.error}</span> : null}
        </td>
        <td className="journey-hops">
          {journey.hops.map((h) => `${h.hop} ${formatMs(h.duration_ms)}`).join(" → ")}
        </td>
      </tr>
      {expanded ? (
        <tr className="mark-detail">
          <td colSpan={5}>
            <Waterfall journey={journey} />
          </td>
        </tr>
      ) : null}
    </>
  );
}

/** Journeys from the marker: one GET, then server-sent pushes (no polling). */
function useJourneys() {
  const [journeys, dispatch] = useReducer(journeysReducer, new Map());
  const [live, setLive] = useState(false);
  useEffect(() => {
    let cancelled = false;
    fetch("/api/journeys?limit=200", { cache: "no-store" })
      .then((r) => (r.ok ? r.json() : { journeys: [] }))
      .then((body) => !cancelled && dispatch({ type: "loaded", journeys: body.journeys }))
      .catch(() => {});
    // EventSource reconnects by itself after an error.
    const source = new EventSource("/api/journeys/events");
    source.onopen = () => setLive(true);
    source.onerror = () => setLive(false);
    source.addEventListener("journey", (event) => {
      try {
        dispatch({ type: "updated", journey: JSON.parse(event.data) });
      } catch {
        // A malformed push is ignored; the next one replaces the journey.
      }
    });
    return () => {
      cancelled = true;
      source.close();
    };
  }, []);
  return { journeys, live };
}

function Marker({ config }) {
  const [connection, setConnection] = useState({ status: State.CONNECTING, reason: null, retryAt: null });
  const [marks, dispatch] = useReducer(marksReducer, []);
  const [text, setText] = useState("");
  const [burst, setBurst] = useState(10);
  const [expanded, setExpanded] = useState(null);
  const { journeys, live } = useJourneys();
  const stallS = config.journey_stall_s ?? 10;
  const now = useNow(marks.some((m) => m.status === "published"));
  const ampsRef = useRef(null);
  const url = useMemo(() => ampsUrl(config.amps_websocket_url, window.location), [config]);
  const tracing = useMemo(
    () =>
      createTracing({
        serviceName: config.service_name,
        tracesUrl: config.traces_enabled ? new URL("/v1/traces", window.location.origin).href : null,
      }),
    [config],
  );

  useEffect(() => {
    const amps = new AmpsConnection({ url, clientName: "ampsflow-marker", onState: setConnection });
    ampsRef.current = amps;
    amps.start();
    const flush = () => {
      tracing.provider.forceFlush().catch(() => {});
    };
    window.addEventListener("pagehide", flush);
    return () => {
      window.removeEventListener("pagehide", flush);
      amps.stop();
      ampsRef.current = null;
    };
  }, [url, tracing]);

  const sendMark = useCallback(
    (markText) => {
      const id = uuid4(fillRandom);
      const span = startPublishSpan(tracing.tracer, { topic: config.topic, messageId: id });
      const context = span.spanContext();
      const createdAt = new Date();
      const correlationId = encodeCorrelationId(context);
      const { body, bodySize } = buildMark({ id, text: markText, createdAt, correlationId });
      span.setAttributes(publishAttributes({ topic: config.topic, messageId: id, bodySize }));
      dispatch({
        type: "added",
        mark: { id, text: markText, createdAt, traceId: context.traceId, status: "sending", reason: null },
      });
      const amps = ampsRef.current;
      const published =
        amps === null
          ? Promise.reject(new Error("not connected to AMPS"))
          : amps.publish(config.topic, body, correlationId);
      published.then(
        () => {
          span.end();
          dispatch({ type: "settled", id, status: "published", at: new Date() });
        },
        (error) => {
          recordPublishFailure(span, error);
          span.end();
          dispatch({ type: "settled", id, status: "failed", reason: error.message });
        },
      );
    },
    [config, tracing],
  );

  const onMark = (event) => {
    event.preventDefault();
    if (text.trim() === "") {
      return;
    }
    sendMark(text);
  };

  const onBurst = (event) => {
    event.preventDefault();
    const count = Number(burst);
    for (const markText of burstTexts(text.trim() === "" ? "burst" : text, count)) {
      sendMark(markText);
    }
  };

  const counts = marks.reduce(
    (acc, m) => ({ ...acc, [m.status]: (acc[m.status] ?? 0) + 1 }),
    { sending: 0, published: 0, failed: 0 },
  );
  const burstValid = Number.isInteger(Number(burst)) && Number(burst) >= 1 && Number(burst) <= MAX_BURST;

  return (
    <>
      <header className="topbar">
        <h1>
          ampsflow <span className="subtitle">marker</span>
        </h1>
        <ConnectionBadge state={connection} url={url} />
      </header>
      <main>
        <section className="panel">
          <form className="mark-form" onSubmit={onMark}>
            <label htmlFor="mark-text">Text</label>
            <input
              id="mark-text"
              type="text"
              value={text}
              maxLength={2000}
              autoComplete="off"
              placeholder="What happened?"
              onChange={(e) => setText(e.target.value)}
            />
            <button id="mark-button" type="submit" disabled={text.trim() === ""}>
              Mark
            </button>
          </form>
          <form className="burst-form" onSubmit={onBurst}>
            <label htmlFor="burst-count">Burst</label>
            <input
              id="burst-count"
              type="number"
              min={1}
              max={MAX_BURST}
              value={burst}
              onChange={(e) => setBurst(e.target.value)}
            />
            <button id="burst-button" type="submit" className="secondary" disabled={!burstValid}>
              Send {burstValid ? Number(burst) : "N"} marks
            </button>
          </form>
          <dl className="facts">
            <div>
              <dt>Topic</dt>
              <dd id="topic">{config.topic}</dd>
            </div>
            <div>
              <dt>Service</dt>
              <dd>{config.service_name}</dd>
            </div>
            <div>
              <dt>Traces</dt>
              <dd id="traces-note">
                {config.traces_upstream
                  ? "relayed by the marker and forwarded to the collector"
                  : "relayed by the marker (no collector configured)"}
                {live ? " · journeys live" : " · journeys reconnecting…"}
              </dd>
            </div>
          </dl>
        </section>
        <section className="panel">
          <div className="list-header">
            <h2>Sent marks</h2>
            <p className="counts" id="counts">
              <span className="count-sending">{counts.sending} sending</span>
              <span className="count-published">{counts.published} published</span>
              <span className="count-failed">{counts.failed} failed</span>
            </p>
          </div>
          {marks.length === 0 ? (
            <p className="empty">No marks yet. Type a text and press Mark.</p>
          ) : (
            <div className="table-wrap">
              <table id="marks">
                <thead>
                  <tr>
                    <th>Time</th>
                    <th>Text</th>
                    <th>Message id</th>
                    <th>Trace id</th>
                    <th>Status</th>
                    <th>Journey</th>
                    <th>
                      <span className="visually-hidden">Trace</span>
                    </th>
                  </tr>
                </thead>
                <tbody>
                  {marks.map((mark) => (
                    <MarkRow
                      key={mark.id}
                      mark={mark}
                      journey={journeys.get(mark.traceId)}
                      jaegerUiUrl={config.jaeger_ui_url}
                      now={now}
                      stallS={stallS}
                      expanded={expanded === mark.id}
                      onToggle={() => setExpanded(expanded === mark.id ? null : mark.id)}
                    />
                  ))}
                </tbody>
              </table>
            </div>
          )}
        </section>
        <RecentJourneys journeys={journeys} />
      </main>
    </>
  );
}

export default function App() {
  const [config, setConfig] = useState(null);
  const [error, setError] = useState(null);

  useEffect(() => {
    let cancelled = false;
    fetch("/config.json", { cache: "no-store" })
      .then((response) => {
        if (!response.ok) {
          throw new Error(`GET /config.json: HTTP ${response.status}`);
        }
        return response.json();
      })
      .then(
        (value) => !cancelled && setConfig(value),
        (err) => !cancelled && setError(err.message),
      );
    return () => {
      cancelled = true;
    };
  }, []);

  if (error !== null) {
    return (
      <main>
        <p className="fatal" id="config-error">
          Cannot load the page configuration: {error}
        </p>
      </main>
    );
  }
  if (config === null) {
    return (
      <main>
        <p className="loading">Loading…</p>
      </main>
    );
  }
  return <Marker config={config} />;
}
