import { SpanKind, SpanStatusCode } from "@opentelemetry/api";
import { InMemorySpanExporter, SimpleSpanProcessor, WebTracerProvider } from "@opentelemetry/sdk-trace-web";
import { describe, expect, test } from "vitest";

import { createTracing, recordPublishFailure, startPublishSpan } from "../src/tracing.js";

function recordingTracer() {
  const exporter = new InMemorySpanExporter();
  const provider = new WebTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });
  return { exporter, tracer: provider.getTracer("test") };
}

describe("startPublishSpan", () => {
  test("starts a root PRODUCER span named publish-message", () => {
    const { exporter, tracer } = recordingTracer();
    startPublishSpan(tracer, { topic: "internal", messageId: "m1" }).end();
    const [span] = exporter.getFinishedSpans();
    expect(["publish-message", SpanKind.PRODUCER, undefined]).toEqual([span.name, span.kind, span.parentSpanContext]);
  });

  test("carries the destination and message id", () => {
    const { exporter, tracer } = recordingTracer();
    startPublishSpan(tracer, { topic: "internal", messageId: "m1" }).end();
    const { attributes } = exporter.getFinishedSpans()[0];
    expect(["internal", "m1"]).toEqual([attributes["messaging.destination.name"], attributes["messaging.message.id"]]);
  });

  test("is sampled, so the CorrelationId flags are 01", () => {
    const { tracer } = recordingTracer();
    const span = startPublishSpan(tracer, { topic: "internal", messageId: "m1" });
    expect(1).toBe(span.spanContext().traceFlags);
  });
});

describe("recordPublishFailure", () => {
  test("sets status ERROR with the reason", () => {
    const { exporter, tracer } = recordingTracer();
    const span = startPublishSpan(tracer, { topic: "internal", messageId: "m1" });
    recordPublishFailure(span, new Error("not connected to AMPS"));
    span.end();
    expect({ code: SpanStatusCode.ERROR, message: "not connected to AMPS" }).toEqual(exporter.getFinishedSpans()[0].status);
  });

  test("adds error.type and an exception event", () => {
    const { exporter, tracer } = recordingTracer();
    const span = startPublishSpan(tracer, { topic: "internal", messageId: "m1" });
    recordPublishFailure(span, new Error("boom"));
    span.end();
    const finished = exporter.getFinishedSpans()[0];
    expect(["publish_failed", "exception"]).toEqual([finished.attributes["error.type"], finished.events[0].name]);
  });
});

describe("createTracing", () => {
  test("names the service in the resource", () => {
    const { provider } = createTracing({ serviceName: "react-web-app", tracesUrl: null });
    const tracer = provider.getTracer("t");
    const span = tracer.startSpan("x");
    expect("react-web-app").toBe(span.resource.attributes["service.name"]);
  });
});
