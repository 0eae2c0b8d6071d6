//! [`Health`]: the state of a bus's connection and subscriptions.

/// State of the connection to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionState {
    /// Connected and usable.
    Connected,
    /// Lost and being re-established by the client.
    Reconnecting,
    /// Down, with no reconnect under way.
    Disconnected,
    /// Closed by `close()`.
    Closed,
}

/// A snapshot of a bus's health, from [`EventBus::health`](crate::EventBus::health).
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    /// The backend's name (`memory`, `nats`, `kafka`).
    pub backend: &'static str,
    /// The connection's state.
    pub connection: ConnectionState,
    /// Publishes accepted and not yet acknowledged (count).
    pub publishes_in_flight: usize,
    /// Each open subscription.
    pub subscriptions: Vec<SubscriptionHealth>,
    /// The end-to-end heartbeat, when started
    /// ([`EventBus::start_heartbeat`](crate::EventBus::start_heartbeat)).
    pub heartbeat: Option<crate::heartbeat::HeartbeatHealth>,
}

impl Health {
    /// Connected, no heartbeat alert, and no subscription has a stalled
    /// aggregate or a dead fetch loop.
    pub fn is_healthy(&self) -> bool {
        self.connection == ConnectionState::Connected
            && !self.heartbeat_alert()
            && self
                .subscriptions
                .iter()
                .all(|s| s.fetching && s.stalled_aggregates == 0)
    }

    /// Readiness (e.g. a Kubernetes readiness probe: send this instance
    /// traffic, count it in service): connected, every subscription's
    /// fetch loop running, and no subscription over its lag threshold
    /// (`consumer.lag_alert_messages`, `consumer.lag_alert_age_ms`), no
    /// subscription waiting for the partitions a rebalance owes it
    /// ([`SubscriptionHealth::awaiting_partitions`]), and no heartbeat
    /// alert. False while (re)connecting.
    pub fn is_ready(&self) -> bool {
        self.connection == ConnectionState::Connected
            && !self.heartbeat_alert()
            && self
                .subscriptions
                .iter()
                .all(|s| s.fetching && !s.lag_alert && !s.awaiting_partitions())
    }

    /// The heartbeat is started and none of its beats came back in time.
    pub fn heartbeat_alert(&self) -> bool {
        self.heartbeat.as_ref().is_some_and(|h| h.alert)
    }

    /// Liveness (a liveness probe: restart this instance when false): false
    /// only when the process cannot recover by itself: the bus is closed, or
    /// a subscription's fetch loop ended while the subscription is open.
    /// A broker outage, a rebalance, lag or a stalled aggregate keep it
    /// live: the client reconnects, and a restart would not help.
    pub fn is_live(&self) -> bool {
        self.connection != ConnectionState::Closed && self.subscriptions.iter().all(|s| s.fetching)
    }
}

/// The state of one subscription.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionHealth {
    /// The topic.
    pub topic: String,
    /// The consumer group.
    pub group: String,
    /// Whether events are handled in per-aggregate order (envelope subscriptions).
    pub ordered: bool,
    /// Whether its fetch loop is running.
    pub fetching: bool,
    /// Messages fetched and not yet settled (count).
    pub in_flight: usize,
    /// Aggregates whose head message exhausted its attempts with no
    /// dead-letter topic, parked and retried with capped backoff (count).
    pub stalled_aggregates: usize,
    /// Messages handled successfully (count).
    pub handled: u64,
    /// Failed handler attempts (count).
    pub failed_attempts: u64,
    /// Messages dead-lettered (count).
    pub dead_lettered: u64,
    /// Deliveries of an event this subscription had already settled
    /// (redeliveries after a broker crash or rebalance, or duplicates),
    /// acked without calling the handler (count; `consumer.dedup_window`).
    pub duplicates_skipped: u64,
    /// The last handler or backend error, as text.
    pub last_error: Option<String>,
    /// This member's share of its group, where the backend partitions
    /// groups (NATS, memory); `None` where the broker assigns partitions
    /// itself (Kafka).
    pub assignment: Option<crate::GroupAssignment>,
    /// Messages on this member's partitions that the broker holds and the
    /// group has not settled, fetched-and-unsettled included (count); `None`
    /// when the backend has not measured it yet. NATS: pending plus
    /// ack-pending of each owned partition's consumer; Kafka: log end (that
    /// of the partition's last fetch response) minus the group's committed
    /// offset of each assigned partition; memory:
    /// queued, redelivered and in-flight messages of owned partitions.
    /// NATS and Kafka measure it every second.
    pub lag: Option<u64>,
    /// Age of the oldest fetched-and-unsettled event, from its envelope
    /// timestamp (raw messages: from their fetch), in ms; `None` when
    /// nothing is in flight. A parked aggregate's head event keeps growing
    /// it.
    pub oldest_unsettled_age_ms: Option<u64>,
    /// Whether [`lag`](SubscriptionHealth::lag) reached
    /// `consumer.lag_alert_messages`, or
    /// [`oldest_unsettled_age_ms`](SubscriptionHealth::oldest_unsettled_age_ms)
    /// reached `consumer.lag_alert_age_ms` (the original SDK's backlog
    /// alert: 1,000 messages or 5 minutes).
    pub lag_alert: bool,
}

impl SubscriptionHealth {
    /// This member owns no partition although the group has no more
    /// members than partitions, so its fair share is at least one: a
    /// rebalance has not given it its share yet (or took it away). A
    /// standby member of a group with more members than partitions owns
    /// nothing legitimately and is not awaiting. False where the backend
    /// reports no assignment.
    pub fn awaiting_partitions(&self) -> bool {
        self.assignment.as_ref().is_some_and(|a| {
            a.owned.is_empty() && a.members > 0 && a.members as u64 <= a.partition_count as u64
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GroupAssignment;

    fn subscription(assignment: Option<GroupAssignment>) -> SubscriptionHealth {
        SubscriptionHealth {
            topic: "orders".into(),
            group: "billing".into(),
            ordered: true,
            fetching: true,
            in_flight: 0,
            stalled_aggregates: 0,
            handled: 0,
            failed_attempts: 0,
            dead_lettered: 0,
            duplicates_skipped: 0,
            last_error: None,
            assignment,
            lag: Some(0),
            oldest_unsettled_age_ms: None,
            lag_alert: false,
        }
    }

    fn health(s: SubscriptionHealth) -> Health {
        Health {
            backend: "memory",
            connection: ConnectionState::Connected,
            publishes_in_flight: 0,
            subscriptions: vec![s],
            heartbeat: None,
        }
    }

    #[test]
    fn a_member_owed_partitions_is_not_ready_and_a_standby_is() {
        let share = |owned: Vec<u32>, members: usize| GroupAssignment {
            partition_count: 4,
            owned,
            members,
            rebalances: 1,
            offset_gaps: 0,
        };
        assert!(health(subscription(Some(share(vec![0, 1], 2)))).is_ready());
        // Two members, four partitions, none owned: a rebalance owes it some.
        let waiting = subscription(Some(share(vec![], 2)));
        assert!(waiting.awaiting_partitions());
        assert!(!health(waiting).is_ready());
        assert!(health(subscription(Some(share(vec![], 2)))).is_live());
        // Five members, four partitions: one stands by, ready.
        assert!(health(subscription(Some(share(vec![], 5)))).is_ready());
        // No assignment reported (the broker assigns): no opinion.
        assert!(health(subscription(None)).is_ready());
    }
}
