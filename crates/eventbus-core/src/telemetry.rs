//! Metrics through the [`metrics`] facade: every name, unit and description
//! in one place ([`describe`]), and the handles a subscription records
//! through. Install any `metrics` recorder (the facade crate's `prometheus`
//! feature has a one-call Prometheus exporter); without one, recording costs
//! next to nothing.
//!
//! Names follow Prometheus and OpenTelemetry conventions: counters end in
//! `_total`, durations are in seconds (`_seconds`), sizes in messages.
//! Labels are `backend`, `topic` and `group` (consumer side), never an
//! aggregate id or event id (unbounded cardinality).

use std::sync::Once;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Unit};

/// Envelopes and messages the broker confirmed (counter; labels `backend`, `topic`).
pub const PUBLISHED: &str = "eventbus_published_total";
/// Publishes that failed: refused, timed out or not confirmed (counter; `backend`, `topic`).
pub const PUBLISH_ERRORS: &str = "eventbus_publish_errors_total";
/// Messages handled successfully and acked (counter; `backend`, `topic`, `group`).
pub const HANDLED: &str = "eventbus_consumer_handled_total";
/// Failed handler attempts: errors, panics, timeouts, undecodable messages (counter).
pub const HANDLER_ERRORS: &str = "eventbus_consumer_handler_errors_total";
/// Attempts after the first of a message (counter).
pub const RETRIES: &str = "eventbus_consumer_retries_total";
/// Messages dead-lettered (counter).
pub const DEAD_LETTERED: &str = "eventbus_consumer_dead_lettered_total";
/// Redelivered events acked without calling the handler again (counter).
pub const DUPLICATES_SKIPPED: &str = "eventbus_consumer_duplicates_skipped_total";
/// Aggregates stalled now: parked, or retrying a dead letter (gauge).
pub const STALLED_AGGREGATES: &str = "eventbus_consumer_stalled_aggregates";
/// Messages fetched and not yet settled (gauge).
pub const IN_FLIGHT: &str = "eventbus_consumer_in_flight";
/// Messages waiting in the broker for this subscription's group: lag (gauge).
pub const LAG: &str = "eventbus_consumer_lag";
/// One handler attempt, in seconds (histogram).
pub const HANDLER_DURATION: &str = "eventbus_consumer_handler_duration_seconds";
/// From the envelope's timestamp to its successful handling, in seconds (histogram).
pub const END_TO_END_LATENCY: &str = "eventbus_consumer_end_to_end_latency_seconds";
/// Changes of a member's partitions (counter; `backend`).
pub const REBALANCES: &str = "eventbus_rebalances_total";
/// Records a broker served past the offset a consumer expected next in a
/// partition (counter; `backend`, `topic`; Kafka): transaction markers and
/// compacted records leave such gaps, a broker serving a later record
/// before an earlier one does too. See
/// [`GroupAssignment::offset_gaps`](crate::GroupAssignment::offset_gaps).
pub const OFFSET_GAPS: &str = "eventbus_consumer_offset_gaps_total";
/// Outbox rows the relay published and marked (counter).
pub const OUTBOX_PUBLISHED: &str = "eventbus_outbox_published_total";
/// Failed outbox publish attempts (counter).
pub const OUTBOX_FAILED_ATTEMPTS: &str = "eventbus_outbox_failed_attempts_total";
/// Outbox rows dead-lettered (counter).
pub const OUTBOX_DEAD_LETTERED: &str = "eventbus_outbox_dead_lettered_total";
/// Outbox rounds whose claim another relay took over (counter).
pub const OUTBOX_LOST_CLAIMS: &str = "eventbus_outbox_lost_claims_total";
/// Outbox rows by `status` (gauge).
pub const OUTBOX_ROWS: &str = "eventbus_outbox_rows";
/// Age of the oldest pending outbox row, in seconds (gauge).
pub const OUTBOX_OLDEST_PENDING_AGE: &str = "eventbus_outbox_oldest_pending_age_seconds";

/// Registers the unit and description of every metric above with the
/// installed recorder (once per process; later calls do nothing). Called
/// by [`EventBus::new`](crate::EventBus::new); call it yourself after
/// installing a recorder later than that.
pub fn describe() {
    static ONCE: Once = Once::new();
    ONCE.call_once(describe_now);
}

/// Describes every metric again, for a recorder installed after
/// [`describe`] ran (descriptions go to the recorder installed at the time).
pub fn describe_again() {
    describe_now();
}

fn describe_now() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(PUBLISHED, Unit::Count, "Messages the broker confirmed");
    describe_counter!(
        PUBLISH_ERRORS,
        Unit::Count,
        "Publishes refused, timed out or not confirmed"
    );
    describe_counter!(HANDLED, Unit::Count, "Messages handled successfully and acked");
    describe_counter!(
        HANDLER_ERRORS,
        Unit::Count,
        "Failed handler attempts (errors, panics, timeouts, undecodable messages)"
    );
    describe_counter!(
        RETRIES,
        Unit::Count,
        "Handler attempts after the first of a message"
    );
    describe_counter!(DEAD_LETTERED, Unit::Count, "Messages dead-lettered");
    describe_counter!(
        DUPLICATES_SKIPPED,
        Unit::Count,
        "Redelivered events acked without calling the handler again"
    );
    describe_gauge!(
        STALLED_AGGREGATES,
        Unit::Count,
        "Aggregates stalled now (parked, or retrying a dead letter)"
    );
    describe_gauge!(IN_FLIGHT, Unit::Count, "Messages fetched and not yet settled");
    describe_gauge!(
        LAG,
        Unit::Count,
        "Messages in the broker not yet settled by this group (lag)"
    );
    describe_histogram!(HANDLER_DURATION, Unit::Seconds, "One handler attempt");
    describe_histogram!(
        END_TO_END_LATENCY,
        Unit::Seconds,
        "From the envelope's timestamp to its successful handling"
    );
    describe_counter!(REBALANCES, Unit::Count, "Changes of a member's partitions");
    describe_counter!(
        OFFSET_GAPS,
        Unit::Count,
        "Records served past the offset expected next (transaction markers, compaction, or a broker serving out of order)"
    );
    describe_counter!(OUTBOX_PUBLISHED, Unit::Count, "Outbox rows published and marked");
    describe_counter!(
        OUTBOX_FAILED_ATTEMPTS,
        Unit::Count,
        "Failed outbox publish attempts"
    );
    describe_counter!(OUTBOX_DEAD_LETTERED, Unit::Count, "Outbox rows dead-lettered");
    describe_counter!(
        OUTBOX_LOST_CLAIMS,
        Unit::Count,
        "Outbox rounds whose claim another relay took over"
    );
    describe_gauge!(OUTBOX_ROWS, Unit::Count, "Outbox rows by status");
    describe_gauge!(
        OUTBOX_OLDEST_PENDING_AGE,
        Unit::Seconds,
        "Age of the oldest pending outbox row"
    );
}

/// A subscription's metric handles, labelled once (`backend`, `topic`,
/// `group`), so recording on the message path is an atomic add.
#[derive(Clone)]
pub(crate) struct SubscriptionMetrics {
    pub(crate) handled: Counter,
    pub(crate) handler_errors: Counter,
    pub(crate) retries: Counter,
    pub(crate) dead_lettered: Counter,
    pub(crate) duplicates_skipped: Counter,
    pub(crate) stalled: Gauge,
    pub(crate) in_flight: Gauge,
    pub(crate) lag: Gauge,
    pub(crate) handler_duration: Histogram,
    pub(crate) end_to_end: Histogram,
}

impl SubscriptionMetrics {
    pub(crate) fn new(backend: &'static str, topic: &str, group: &str) -> Self {
        let labels = [
            ("backend", backend.to_owned()),
            ("topic", topic.to_owned()),
            ("group", group.to_owned()),
        ];
        Self {
            handled: metrics::counter!(HANDLED, &labels),
            handler_errors: metrics::counter!(HANDLER_ERRORS, &labels),
            retries: metrics::counter!(RETRIES, &labels),
            dead_lettered: metrics::counter!(DEAD_LETTERED, &labels),
            duplicates_skipped: metrics::counter!(DUPLICATES_SKIPPED, &labels),
            stalled: metrics::gauge!(STALLED_AGGREGATES, &labels),
            in_flight: metrics::gauge!(IN_FLIGHT, &labels),
            lag: metrics::gauge!(LAG, &labels),
            handler_duration: metrics::histogram!(HANDLER_DURATION, &labels),
            end_to_end: metrics::histogram!(END_TO_END_LATENCY, &labels),
        }
    }

    /// Records a successful handling of an envelope stamped `timestamp`.
    pub(crate) fn end_to_end(&self, timestamp: &crate::Timestamp) {
        let age = chrono::Utc::now().signed_duration_since(timestamp);
        if let Ok(age) = age.to_std() {
            self.end_to_end.record(age.as_secs_f64());
        }
    }

    pub(crate) fn handler_duration(&self, d: Duration) {
        self.handler_duration.record(d.as_secs_f64());
    }
}

impl std::fmt::Debug for SubscriptionMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SubscriptionMetrics")
    }
}
