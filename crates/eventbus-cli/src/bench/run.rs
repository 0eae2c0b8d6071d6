//! One level through our bus.

use std::time::Instant;

use eventbus::{Envelope, SubscribeOptions};
use futures::{FutureExt, StreamExt};
use indicatif::ProgressBar;

use super::measure::{PROBE_AGGREGATE, Published, Recorder, Sampler, histogram};
use super::{LevelReport, Scenario};
use crate::backends::Target;

/// Publishes and consumes one level of `events` through an `EventBus`,
/// consumed by `members` members of one group (in-process, each on a bus
/// and broker connection of its own, as separate processes would be).
pub(crate) async fn level(
    target: &Target,
    scenario: &Scenario,
    events: usize,
    members: usize,
    progress: ProgressBar,
) -> eventbus::Result<LevelReport> {
    let sampler = Sampler::start();
    let mut config = scenario.bus.clone();
    // Nobody reads a results stream here: a full one would stall publishing.
    config.results.enabled = false;
    if let Some(concurrency) = scenario.concurrency {
        config.consumer.concurrency = concurrency.max(1);
    }
    let buses = target.group_buses(members.max(1), config).await?;
    let bus = buses[0].clone();
    let topics = scenario.topic_names(&super::run_id("bus", events));
    let recorder = Recorder::new(progress);
    let mut subscriptions = Vec::new();
    for (member, member_bus) in buses.iter().enumerate() {
        for topic in &topics {
            let (name, recorder) = (topic.clone(), recorder.clone());
            let handler = move |e: Envelope| {
                recorder.record_as(member as u64, &name, &e);
                async { Ok::<_, std::convert::Infallible>(()) }
            };
            subscriptions.push(
                member_bus
                    .subscribe_envelope(topic, SubscribeOptions::group("bench"), handler)
                    .await?,
            );
        }
    }
    if members > 1 {
        // Timing starts once every member owns its share.
        let shared = super::measure::wait_until(scenario.timeout, || {
            subscriptions
                .iter()
                .all(|s| s.health().assignment.is_some_and(|a| !a.owned.is_empty()))
        })
        .await;
        if !shared {
            return Err(eventbus::Error::timeout(
                "the members did not each get a share of the group",
            ));
        }
    }
    for topic in &topics {
        let probe = Envelope::builder(PROBE_AGGREGATE, "Probe", 1)
            .json_payload(&0)?
            .build()?;
        bus.publish_envelope_sync(topic, &probe).await?;
    }
    if !recorder.wait_ready(topics.len(), scenario.timeout).await {
        return Err(eventbus::Error::timeout("consumers did not become ready"));
    }
    let mut publish_us = histogram();
    // Results are collected as they complete, so a sustained run holds only the unacked ones.
    let mut pending = futures::stream::FuturesUnordered::new();
    let mut acked = 0;
    let first_send = Instant::now();
    for (t, envelope) in scenario.envelopes(events)? {
        let started = Instant::now();
        pending.push(bus.publish_envelope(&topics[t], &envelope).await?);
        publish_us.saturating_record(started.elapsed().as_micros() as u64);
        while let Some(Some(result)) = pending.next().now_or_never() {
            acked += usize::from(result.is_success());
        }
    }
    while let Some(result) = pending.next().await {
        acked += usize::from(result.is_success());
    }
    recorder.wait_received(events as u64, scenario.timeout).await;
    for s in subscriptions {
        s.close().await?;
    }
    for b in &buses {
        b.close().await?;
    }
    let published = Published {
        label: match members {
            0 | 1 => bus.backend_name().to_owned(),
            n => format!("{} ×{n}", bus.backend_name()),
        },
        events,
        aggregates: scenario.aggregates_for(events),
        acked,
        publish_us,
        first_send,
    };
    Ok(published.report(&recorder, sampler).await)
}
