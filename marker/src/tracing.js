// The page's tracer: one `publish-message` PRODUCER span per mark, exported
// as OTLP/HTTP protobuf to the serving origin's /v1/traces (the marker server
// forwards it to the collector, so no CORS setup is needed anywhere).

import { SpanKind, SpanStatusCode } from "@opentelemetry/api";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-proto";
import { resourceFromAttributes } from "@opentelemetry/resources";
import { BatchSpanProcessor, WebTracerProvider } from "@opentelemetry/sdk-trace-web";
import { ATTR_SERVICE_NAME } from "@opentelemetry/semantic-conventions";

import { publishAttributes } from "./marks.js";

/** Short batch delay: a click's span should reach the backend in about a second. */
const SCHEDULED_DELAY_MS = 500;

/**
 * Build the tracer. Without a traces URL spans are still created (their
 * ids make the CorrelationId) but not exported.
 *
 * @param {{serviceName: string, tracesUrl: string | null}} options
 */
export function createTracing({ serviceName, tracesUrl }) {
  const spanProcessors = [];
  if (tracesUrl) {
    const exporter = new OTLPTraceExporter({ url: tracesUrl, timeoutMillis: 10000 });
    spanProcessors.push(
      new BatchSpanProcessor(exporter, {
        scheduledDelayMillis: SCHEDULED_DELAY_MS,
        maxExportBatchSize: 64,
        maxQueueSize: 2048,
      }),
    );
  }
  const provider = new WebTracerProvider({
    resource: resourceFromAttributes({ [ATTR_SERVICE_NAME]: serviceName }),
    spanProcessors,
  });
  return { provider, tracer: provider.getTracer("ampsflow-marker") };
}

/**
 * Start the root `publish-message` span of a mark.
 *
 * @returns the span; its context makes the mark's CorrelationId.
 */
export function startPublishSpan(tracer, { topic, messageId }) {
  return tracer.startSpan("publish-message", {
    kind: SpanKind.PRODUCER,
    root: true,
    attributes: publishAttributes({ topic, messageId, bodySize: 0 }),
  });
}

/** Record a failed publish on its span: status ERROR, error.type, exception event. */
export function recordPublishFailure(span, error) {
  span.setAttribute("error.type", error.name && error.name !== "Error" ? error.name : "publish_failed");
  span.recordException(error);
  span.setStatus({ code: SpanStatusCode.ERROR, message: error.message });
}
