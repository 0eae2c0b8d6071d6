//! The conformance suite every backend passes, modelled on Watermill's
//! universal pub/sub tests: [`conformance_tests!`](crate::conformance_tests) makes one test per case from a [`BusFactory`] and the
//! backend's [`Capabilities`].
//!
//! Each case uses topics and groups of its own (random suffix), so cases can
//! share one broker. Waits are liveness bounds ([`Capabilities::timeout`]),
//! never performance assertions.

mod cases;

use std::time::Duration;

use async_trait::async_trait;

use eventbus_core::{BusConfig, EventBus};

/// What a backend can do, so the suite skips what does not apply.
#[derive(Debug, Clone)]
pub struct Capabilities {
    /// The backend's name, for messages.
    pub name: &'static str,
    /// Unacked messages survive their subscriber and go to the next member
    /// of the group (NATS durable consumers, Kafka committed offsets, memory).
    pub persistent: bool,
    /// Raw messages keep their record key end to end.
    pub keys: bool,
    /// The broker outlives a member: a member killed mid-stream (its runtime
    /// dropped: no close, no flush, settlements in flight lost) can be
    /// restarted in its group and resumes. False for the memory backend,
    /// whose broker dies with its process (a memory backend shared by
    /// clients from [`MemoryBackend::connect`](eventbus_core::MemoryBackend::connect) outlives them).
    pub restartable: bool,
    /// The members of one group split a topic's aggregates between them
    /// (memory, NATS partitioned topics, Kafka topics with several
    /// partitions). False where one member at a time consumes and the
    /// others stand by (an unpartitioned NATS topic).
    pub shares_groups: bool,
    /// A member's lag (`Health::lag`) can be trusted against this server.
    pub lag: bool,
    /// A group's lag measured without joining it (`EventBus::group_lag`)
    /// can be trusted against this server: false for Kafka on tansu, whose
    /// log-end offsets by ListOffsets are wrong (a member's lag takes them
    /// from its fetch responses instead).
    pub group_lag: bool,
    /// Longest wait for any expected delivery or result.
    pub timeout: Duration,
}

impl Capabilities {
    /// Every capability, with a 60 s bound.
    pub fn all(name: &'static str) -> Self {
        Self {
            name,
            persistent: true,
            keys: true,
            restartable: true,
            shares_groups: true,
            lag: true,
            group_lag: true,
            timeout: Duration::from_secs(60),
        }
    }
}

/// Makes a fresh [`EventBus`] over the backend under test, with `config`.
/// Buses of one factory talk to the same broker.
#[async_trait]
pub trait BusFactory: Send + Sync {
    /// A new bus.
    async fn bus(&self, config: BusConfig) -> EventBus;
}

#[async_trait]
impl<F, Fut> BusFactory for F
where
    F: Fn(BusConfig) -> Fut + Send + Sync,
    Fut: Future<Output = EventBus> + Send,
{
    async fn bus(&self, config: BusConfig) -> EventBus {
        self(config).await
    }
}

/// One case of the suite.
pub type Case = for<'a> fn(&'a dyn BusFactory, &'a Capabilities) -> futures::future::BoxFuture<'a, ()>;

/// Every case, by name.
pub fn cases() -> Vec<(&'static str, Case)> {
    cases::all()
}

/// Runs the case called `name`, bounded by three times `caps.timeout`.
///
/// # Panics
/// When the case fails, does not finish in time, or no case has that name.
pub async fn run_case(name: &str, factory: &dyn BusFactory, caps: &Capabilities) {
    let case = cases()
        .into_iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no conformance case {name}"))
        .1;
    let started = std::time::Instant::now();
    match tokio::time::timeout(caps.timeout * 3, case(factory, caps)).await {
        Ok(()) => eprintln!("conformance[{}]: {name} ok ({:?})", caps.name, started.elapsed()),
        Err(_) => panic!(
            "conformance[{}]: {name} did not finish within {:?}",
            caps.name,
            caps.timeout * 3
        ),
    }
}

/// Generates the conformance suite in a backend's test file: one
/// `#[tokio::test]` per case (each reported and failing on its own, as
/// Watermill's `TestPubSub` subtests), from the one list of case names that
/// [`cases`] is built from too.
///
/// `$setup` is an `async fn() -> (F, Capabilities)` where `F:` [`BusFactory`];
/// the factory owns whatever server it started, dropped after the case.
///
/// ```no_run
/// use eventbus_testkit::conformance::{BusFactory, Capabilities};
/// use eventbus_core::{BusConfig, EventBus};
///
/// async fn setup() -> (impl BusFactory, Capabilities) {
///     let factory = |config: BusConfig| async move { EventBus::memory_with(config).unwrap() };
///     (factory, Capabilities::all("memory"))
/// }
///
/// eventbus_testkit::conformance_tests!(setup);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($setup:path) => {
        $crate::conformance_tests!(@list [@cases $setup;]);
    };
    // The one list of case names: `@list [prefix]` calls this macro again
    // with the prefix followed by every name (also used by `cases()`).
    (@list [$($then:tt)*]) => {
        $crate::conformance_tests!($($then)*
            round_trip_keeps_payload_headers_and_key,
            concurrent_publishers_all_received,
            topics_are_isolated,
            per_aggregate_order_over_five_topics,
            retry_after_error_or_panic_keeps_order,
            exhausted_message_is_dead_lettered_with_headers,
            message_without_aggregate_id_is_dead_lettered,
            parked_aggregate_is_reported_stalled_then_recovers,
            blocked_aggregate_does_not_stall_others,
            close_flushes_every_publish_with_one_result,
            resubscribe_in_same_group_loses_nothing,
            two_groups_each_get_everything,
            invalid_envelope_is_rejected_and_nothing_sent,
            operations_after_close_fail_closed,
            every_envelope_yields_one_result_with_its_event_id,
            slow_handler_with_a_deep_queue_keeps_order,
            parked_aggregate_does_not_stop_another_subscription,
            killed_member_restarted_in_its_group_loses_nothing_and_keeps_order,
            an_event_settled_before_is_not_handled_again,
            three_members_share_a_group_in_order_through_join_and_leave,
            killed_member_among_three_loses_nothing_and_keeps_order,
            bad_input_is_dead_lettered_naming_the_field,
            oversized_message_is_refused_at_publish,
            lag_counts_what_the_group_has_not_settled,
            layers_run_inside_the_aggregate_slot,
            browse_reads_without_moving_any_group,
            group_lag_is_measured_without_joining,
            one_trace_spans_publish_and_handle,
            metrics_count_a_known_workload_exactly,
        );
    };
    (@all; $($case:ident),* $(,)?) => {
        pub(super) fn all() -> Vec<(&'static str, Case)> {
            vec![$((stringify!($case), $case as Case)),*]
        }
    };
    (@cases $setup:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (factory, caps) = $setup().await;
                $crate::conformance::run_case(stringify!($case), &factory, &caps).await;
            }
        )*
    };
}
