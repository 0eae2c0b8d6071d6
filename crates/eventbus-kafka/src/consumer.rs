//! One group member per subscription: a `StreamConsumer` whose finished
//! prefix per partition is stored for commit, and which hands over its
//! partitions cleanly on a rebalance.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use eventbus_core::{
    Acker, BackendSubscription, Delivery, Error, ErrorKind, Headers, Message, Position, Result,
};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::offsets::{OffsetTracker, PartitionKey};

/// Rebalance handling: on revoke, fence the revoked partitions (no attempt
/// of their queued or retrying messages starts again here), wait (bounded
/// by `revoke_timeout`, then cancel) for running attempts, then commit
/// their finished prefix.
pub(crate) struct MemberContext {
    pub(crate) tracker: Arc<OffsetTracker>,
    pub(crate) revoke_timeout: Duration,
}

impl ClientContext for MemberContext {}

impl ConsumerContext for MemberContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else {
            return;
        };
        let keys: Vec<PartitionKey> = revoked
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        let wait = || self.tracker.revoke(&keys, self.revoke_timeout);
        // This runs inside the fetch loop's poll: let the runtime move other
        // tasks (the handlers we wait for) off this thread meanwhile.
        let offsets = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        };
        if let Err(e) = commit(consumer, &offsets) {
            tracing::warn!(error = %e, "commit on revoke failed; the next owner may see duplicates");
        }
        tracing::info!(partitions = keys.len(), "partitions revoked");
    }
}

pub(crate) fn commit<C: Consumer<X>, X: ConsumerContext>(
    consumer: &C,
    offsets: &[(PartitionKey, i64)],
) -> Result<()> {
    if offsets.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in offsets {
        tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))
            .map_err(|e| Error::backend("bad offset", e))?;
    }
    consumer
        .commit(&tpl, CommitMode::Sync)
        .map_err(|e| Error::backend("Kafka commit failed", e))
}

pub(crate) struct KafkaSubscription {
    pub(crate) consumer: Arc<StreamConsumer<MemberContext>>,
    pub(crate) tracker: Arc<OffsetTracker>,
}

impl KafkaSubscription {
    fn delivery(&self, m: &rdkafka::message::BorrowedMessage<'_>) -> Delivery {
        let key: PartitionKey = (m.topic().to_owned(), m.partition());
        let (generation, ownership) = self.tracker.fetched(&key, m.offset());
        let mut headers = Headers::new();
        if let Some(h) = m.headers() {
            for header in h.iter() {
                let value = header.value.map(String::from_utf8_lossy).unwrap_or_default();
                headers.insert(header.key, value);
            }
        }
        let message = Message {
            topic: key.0.clone(),
            key: m.key().map(bytes::Bytes::copy_from_slice),
            headers,
            payload: bytes::Bytes::copy_from_slice(m.payload().unwrap_or_default()),
            dedup_id: None,
        };
        Delivery {
            message,
            position: Some(Position::Offset {
                partition: m.partition(),
                offset: m.offset(),
            }),
            delivery_count: 1,
            acker: Box::new(KafkaAcker {
                consumer: self.consumer.clone(),
                tracker: self.tracker.clone(),
                key,
                offset: m.offset(),
                generation,
            }),
            ownership: Some(ownership),
        }
    }
}

#[async_trait]
impl BackendSubscription for KafkaSubscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        Some(match self.consumer.recv().await {
            Ok(m) => Ok(self.delivery(&m)),
            Err(e) => Err(Error::new(ErrorKind::Backend, "Kafka fetch failed").with_source(e)),
        })
    }

    async fn close(self: Box<Self>) -> Result<()> {
        let Self { consumer, tracker } = *self;
        // Commit the finished prefix, then leave the group (a blocking call).
        tokio::task::spawn_blocking(move || {
            let committed = commit(consumer.as_ref(), &tracker.committable());
            consumer.unsubscribe();
            drop(consumer);
            committed
        })
        .await
        .map_err(|e| Error::backend("consumer close failed", e))?
    }
}

struct KafkaAcker {
    consumer: Arc<StreamConsumer<MemberContext>>,
    tracker: Arc<OffsetTracker>,
    key: PartitionKey,
    offset: i64,
    generation: u64,
}

#[async_trait]
impl Acker for KafkaAcker {
    async fn ack(&self) -> Result<()> {
        if let Some(next) = self.tracker.finished(&self.key, self.offset, self.generation) {
            // `store_offsets` stores the offset as given (the next to consume);
            // `store_offset` would add 1 (librdkafka's legacy rd_kafka_offset_store).
            let mut tpl = TopicPartitionList::with_capacity(1);
            let stored = tpl
                .add_partition_offset(&self.key.0, self.key.1, Offset::Offset(next))
                .and_then(|()| self.consumer.store_offsets(&tpl));
            // Fails only when the partition was just revoked: then it is not ours to commit.
            if let Err(e) = stored {
                tracing::debug!(error = %e, "offset not stored");
            }
        }
        Ok(())
    }
}
