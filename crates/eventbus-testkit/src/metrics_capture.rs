//! Metrics captured for the metrics conformance case: `metrics-util`'s
//! debugging recorder, installed once per test process as the global
//! recorder. Cases read their own topic's series only; counters and
//! histogram samples accumulate across reads (the recorder hands each
//! increment and sample out once), so cases reading at the same time take
//! nothing from each other.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use metrics_util::MetricKind;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

/// The process's metrics capture.
#[derive(Debug)]
pub struct MetricsCapture {
    snapshotter: Snapshotter,
    /// Every series read so far, histogram samples accumulated.
    seen: Mutex<HashMap<SeriesId, DebugValue>>,
}

/// A series' identity: kind, name, labels.
type SeriesId = (MetricKind, String, Vec<(String, String)>);

/// One series: kind, name, labels, value.
pub type Series = (MetricKind, String, Vec<(String, String)>, DebugValue);

impl MetricsCapture {
    /// The capture, installed as the global recorder at the first call.
    ///
    /// # Panics
    /// When another global recorder is installed already.
    pub fn global() -> &'static MetricsCapture {
        static CAPTURE: OnceLock<MetricsCapture> = OnceLock::new();
        CAPTURE.get_or_init(|| {
            let recorder = DebuggingRecorder::new();
            let snapshotter = recorder.snapshotter();
            recorder
                .install()
                .expect("no other global metrics recorder in this test process");
            MetricsCapture {
                snapshotter,
                seen: Mutex::new(HashMap::new()),
            }
        })
    }

    /// Every series so far: counters and gauges with every change and
    /// histograms with every sample since the capture started (the
    /// recorder hands each out once); a gauge that is set rather than
    /// incremented reads as the sum of its settings.
    pub fn series(&self) -> Vec<Series> {
        let mut seen = self.seen.lock().unwrap();
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            let labels = key
                .key()
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            let id = (key.kind(), key.key().name().to_owned(), labels);
            match (seen.get_mut(&id), value) {
                (Some(DebugValue::Histogram(all)), DebugValue::Histogram(new)) => all.extend(new),
                // Counters read back as what was added since the last read.
                (Some(DebugValue::Counter(all)), DebugValue::Counter(new)) => *all += new,
                // So do gauges: right for increment/decrement gauges
                // (in-flight), not for gauges that are set (lag).
                (Some(DebugValue::Gauge(all)), DebugValue::Gauge(new)) => *all += new,
                (_, value) => {
                    seen.insert(id, value);
                }
            }
        }
        seen.iter()
            .map(|((kind, name, labels), value)| {
                // DebugValue is not Clone.
                let value = match value {
                    DebugValue::Counter(n) => DebugValue::Counter(*n),
                    DebugValue::Gauge(g) => DebugValue::Gauge(*g),
                    DebugValue::Histogram(s) => DebugValue::Histogram(s.clone()),
                };
                (*kind, name.clone(), labels.clone(), value)
            })
            .collect()
    }
}
