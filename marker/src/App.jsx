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

function MarkRow({ mark, jaegerUiUrl }) {
  const link = traceUrl(jaegerUiUrl, mark.traceId);
  return (
    <tr className="mark" data-mark-id={mark.id} data-trace-id={mark.traceId}>
      <td className="time">{formatTime(mark.createdAt)}</td>
      <td className="text">{mark.text}</td>
      <td className="mono message-id">{mark.id}</td>
      <td className="mono trace-id">{mark.traceId}</td>
      <StatusCell mark={mark} />
      <td className="trace-link">
        {link ? (
          <a href={link} target="_blank" rel="noopener noreferrer">
            open trace
          </a>
        ) : null}
      </td>
    </tr>
  );
}

function Marker({ config }) {
  const [connection, setConnection] = useState({ status: State.CONNECTING, reason: null, retryAt: null });
  const [marks, dispatch] = useReducer(marksReducer, []);
  const [text, setText] = useState("");
  const [burst, setBurst] = useState(10);
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
          dispatch({ type: "settled", id, status: "published" });
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
                {config.traces_enabled ? "exported via /v1/traces" : "not exported (no collector configured)"}
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
                    <th>
                      <span className="visually-hidden">Trace</span>
                    </th>
                  </tr>
                </thead>
                <tbody>
                  {marks.map((mark) => (
                    <MarkRow key={mark.id} mark={mark} jaegerUiUrl={config.jaeger_ui_url} />
                  ))}
                </tbody>
              </table>
            </div>
          )}
        </section>
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
