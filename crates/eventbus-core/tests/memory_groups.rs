//! Memory backend consumer groups: a partition moving between members is
//! revoked before its new owner starts, and comes back to flow even when
//! the member it was moving to leaves first.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbus_core::{BusConfig, Envelope, EventBus, MemoryBackend, SubscribeOptions, partition_for};
use eventbus_testkit::{envelope, eventually};

/// An aggregate id whose events go to `partition` of 2.
fn aggregate_in(partition: u32) -> String {
    (0..)
        .map(|i| format!("agg-{i}"))
        .find(|a| partition_for(a.as_bytes(), 2) == partition)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_to_a_member_that_leaves_first_gives_the_partition_back() {
    let mut config = BusConfig::default();
    config.memory.partitions = 2;
    let broker = MemoryBackend::new(config.memory.clone());
    let a = EventBus::new(broker.connect(), config.clone()).unwrap();
    let slow = aggregate_in(1);
    let release = Arc::new(tokio::sync::Notify::new());
    let handled: Arc<Mutex<Vec<(String, i64)>>> = Default::default();
    let started = Arc::new(AtomicUsize::new(0));
    let (r, h, s, slow_id) = (release.clone(), handled.clone(), started.clone(), slow.clone());
    let sub_a = a
        .subscribe_envelope("t", SubscribeOptions::group("g"), move |e: Envelope| {
            let (r, h, s, slow_id) = (r.clone(), h.clone(), s.clone(), slow_id.clone());
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                if e.aggregate_id == slow_id && e.event_version == 1 {
                    r.notified().await; // holds partition 1 while a rebalance moves it
                }
                h.lock().unwrap().push((e.aggregate_id, e.event_version));
                Ok::<_, std::io::Error>(())
            }
        })
        .await
        .unwrap();
    a.publish_envelope_sync("t", &envelope(&slow, 1)).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || started.load(Ordering::SeqCst) == 1).await);
    // C joins: partition 1 is revoked from A, waiting for A's running attempt.
    let c = EventBus::new(broker.connect(), config.clone()).unwrap();
    let sub_c = c
        .subscribe_envelope("t", SubscribeOptions::group("g"), |_e: Envelope| async {
            Ok::<_, std::io::Error>(())
        })
        .await
        .unwrap();
    // C leaves before the handover completed.
    sub_c.close().await.unwrap();
    c.close().await.unwrap();
    release.notify_one();
    // Partition 1 must flow again (back to A).
    a.publish_envelope_sync("t", &envelope(&slow, 2)).await.unwrap();
    let flowed = eventually(Duration::from_secs(10), || handled.lock().unwrap().len() == 2).await;
    assert!(
        flowed,
        "partition 1 stuck after the handover target left: handled {:?}, A owns {:?}",
        handled.lock().unwrap(),
        sub_a.health().assignment
    );
    assert_eq!(sub_a.health().assignment.unwrap().owned, vec![0, 1]);
    sub_a.close().await.unwrap();
    a.close().await.unwrap();
}

/// A parked aggregate holds at most `memory.max_in_flight_per_partition`
/// messages of its partition; the subscription's other partitions flow,
/// though the parked one has more queued than the subscription's limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_aggregate_holds_back_only_its_partition() {
    let mut config = BusConfig::default();
    config.memory.partitions = 2;
    config.memory.max_in_flight_per_partition = 20;
    config.consumer.max_in_flight = 50;
    config.close_timeout_ms = 500; // the parked aggregate's backoff is cut at close
    config.consumer.retry = eventbus_core::RetryPolicy::fixed(1, 10);
    let bus = EventBus::memory_with(config).unwrap();
    let stuck = aggregate_in(0);
    let free = aggregate_in(1);
    let got = Arc::new(AtomicUsize::new(0));
    let (g, stuck_id) = (got.clone(), stuck.clone());
    let sub = bus
        .subscribe_envelope(
            "parks",
            SubscribeOptions::group("g").park_on_failure(),
            move |e: Envelope| {
                let (g, stuck) = (g.clone(), e.aggregate_id == stuck_id);
                async move {
                    if stuck {
                        return Err(std::io::Error::other("downstream down"));
                    }
                    g.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            },
        )
        .await
        .unwrap();
    for v in 1..=100 {
        bus.publish_envelope_sync("parks", &envelope(&stuck, v))
            .await
            .unwrap();
    }
    assert!(eventually(Duration::from_secs(10), || sub.health().stalled_aggregates == 1).await);
    for v in 1..=100 {
        bus.publish_envelope_sync("parks", &envelope(&free, v))
            .await
            .unwrap();
    }
    let flowed = eventually(Duration::from_secs(10), || got.load(Ordering::SeqCst) == 100).await;
    assert!(
        flowed,
        "the other partition stopped behind a parked aggregate: {} of 100, {:?}",
        got.load(Ordering::SeqCst),
        sub.health()
    );
    assert!(sub.health().in_flight <= 50);
    let _ = sub.close().await;
    let _ = bus.close().await;
}

/// The log keeps a message until every group settled it, and frees it once
/// they have, even when later messages settle first (a slow aggregate's v1
/// acked after other aggregates' events): each trim is triggered by the
/// settlement of the log's first message, so an out-of-order finish must
/// still empty the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_is_freed_once_every_group_settled_even_out_of_order() {
    let broker = MemoryBackend::default();
    let bus = EventBus::new(broker.connect(), BusConfig::default()).unwrap();
    let release = Arc::new(tokio::sync::Notify::new());
    let fast_handled = Arc::new(AtomicUsize::new(0));
    let (r, f) = (release.clone(), fast_handled.clone());
    // Group "fast": the first message (slow-1 v1) settles last.
    let fast = bus
        .subscribe_envelope("log", SubscribeOptions::group("fast"), move |e: Envelope| {
            let (r, f) = (r.clone(), f.clone());
            async move {
                if e.aggregate_id == "slow-1" {
                    r.notified().await;
                }
                f.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(())
            }
        })
        .await
        .unwrap();
    bus.publish_envelope_sync("log", &envelope("slow-1", 1))
        .await
        .unwrap();
    for a in 0..50 {
        bus.publish_envelope_sync("log", &envelope(&format!("agg-{a}"), 1))
            .await
            .unwrap();
    }
    assert!(
        eventually(Duration::from_secs(5), || fast_handled.load(Ordering::SeqCst)
            == 50)
        .await
    );
    assert_eq!(broker.retained("log"), 51, "the first message is still unsettled");
    release.notify_one();
    assert!(
        eventually(Duration::from_secs(5), || broker.retained("log") == 0).await,
        "every message settled by the only group, yet {} retained",
        broker.retained("log")
    );
    // A second group joins at the log's end; a new message waits for both.
    let slow_handled = Arc::new(AtomicUsize::new(0));
    let s = slow_handled.clone();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let slow = bus
        .subscribe_envelope("log", SubscribeOptions::group("slow"), move |_e: Envelope| {
            let (s, g) = (s.clone(), g.clone());
            async move {
                g.acquire().await.unwrap().forget();
                s.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(())
            }
        })
        .await
        .unwrap();
    for v in 2..=11 {
        bus.publish_envelope_sync("log", &envelope("agg-0", v))
            .await
            .unwrap();
    }
    assert!(
        eventually(Duration::from_secs(5), || fast_handled.load(Ordering::SeqCst)
            == 61)
        .await
    );
    assert_eq!(broker.retained("log"), 10, "group slow has settled none");
    gate.add_permits(4);
    assert!(eventually(Duration::from_secs(5), || broker.retained("log") == 6).await);
    gate.add_permits(6);
    assert!(
        eventually(Duration::from_secs(5), || broker.retained("log") == 0).await,
        "both groups settled everything, yet {} retained",
        broker.retained("log")
    );
    assert_eq!(slow_handled.load(Ordering::SeqCst), 10);
    fast.close().await.unwrap();
    slow.close().await.unwrap();
    bus.close().await.unwrap();
}
