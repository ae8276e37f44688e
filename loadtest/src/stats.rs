//! Receive-side statistics: sequence tracking (loss, duplicates, reordering) and
//! latency percentiles.
//!
//! Everything here has bounded memory regardless of how long a stream runs, because
//! the load harness keeps one tracker per received track for many clients at once.
//! Histograms are mergeable so the harness can aggregate latency across clients.

/// How many recent sequence numbers [`SeqTracker`] remembers for duplicate detection.
/// 4096 packets is over 3 s of 300 kbps video, far more than any reordering depth a
/// loopback or LAN path produces.
pub const SEQ_WINDOW: u64 = 4096;

const WINDOW_WORDS: usize = (SEQ_WINDOW / 64) as usize;

/// How a packet's sequence number relates to what was seen before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Higher than every sequence number seen so far.
    InOrder,
    /// Lower than the highest seen, and not seen before.
    Reordered,
    /// Already seen (within the window).
    Duplicate,
    /// So far behind the highest that the window no longer remembers it; counted as
    /// reordered and unique because duplicates can no longer be told apart.
    TooOld,
}

/// Tracks a stream of sender-assigned sequence numbers (`u64`, never wrapping).
///
/// Loss is `expected - unique received`, where `expected` spans the lowest to the
/// highest number seen: a subscriber joins mid-stream, so numbering starts wherever
/// its first packet was.
#[derive(Debug, Clone)]
pub struct SeqTracker {
    /// `None` until the first packet.
    range: Option<(u64, u64)>,
    unique: u64,
    duplicates: u64,
    reordered: u64,
    /// Bit `seq % SEQ_WINDOW` is set when `seq` (within the window below the highest)
    /// was seen.
    seen: [u64; WINDOW_WORDS],
}

impl Default for SeqTracker {
    fn default() -> Self {
        Self {
            range: None,
            unique: 0,
            duplicates: 0,
            reordered: 0,
            seen: [0; WINDOW_WORDS],
        }
    }
}

impl SeqTracker {
    /// Records one arrival and classifies it.
    pub fn record(&mut self, seq: u64) -> Arrival {
        let Some((lowest, highest)) = self.range else {
            self.range = Some((seq, seq));
            self.unique = 1;
            self.set_seen(seq);
            return Arrival::InOrder;
        };
        if seq > highest {
            // Forget the slots that the window slides over.
            let advance = seq - highest;
            if advance >= SEQ_WINDOW {
                self.seen = [0; WINDOW_WORDS];
            } else {
                for s in highest + 1..seq {
                    self.clear_seen(s);
                }
            }
            self.set_seen(seq);
            self.range = Some((lowest, seq));
            self.unique += 1;
            return Arrival::InOrder;
        }
        self.range = Some((lowest.min(seq), highest));
        if highest - seq >= SEQ_WINDOW {
            self.unique += 1;
            self.reordered += 1;
            return Arrival::TooOld;
        }
        if self.is_seen(seq) {
            self.duplicates += 1;
            return Arrival::Duplicate;
        }
        self.set_seen(seq);
        self.unique += 1;
        self.reordered += 1;
        Arrival::Reordered
    }

    /// Distinct sequence numbers received.
    pub fn unique(&self) -> u64 {
        self.unique
    }

    /// Arrivals of a number already seen.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Arrivals below the highest number seen at the time (late, not duplicate).
    pub fn reordered(&self) -> u64 {
        self.reordered
    }

    /// Numbers in `[lowest, highest]` never received. A packet that is merely late
    /// counts as lost until it arrives.
    pub fn lost(&self) -> u64 {
        match self.range {
            Some((lowest, highest)) => (highest - lowest + 1).saturating_sub(self.unique),
            None => 0,
        }
    }

    fn slot(seq: u64) -> (usize, u64) {
        let bit = seq % SEQ_WINDOW;
        ((bit / 64) as usize, 1 << (bit % 64))
    }

    fn set_seen(&mut self, seq: u64) {
        let (word, mask) = Self::slot(seq);
        self.seen[word] |= mask;
    }

    fn clear_seen(&mut self, seq: u64) {
        let (word, mask) = Self::slot(seq);
        self.seen[word] &= !mask;
    }

    fn is_seen(&self, seq: u64) -> bool {
        let (word, mask) = Self::slot(seq);
        self.seen[word] & mask != 0
    }
}

/// A [`SeqTracker`] fed with 16-bit RTP sequence numbers, extended to 64 bits across
/// wrap-arounds: how the harness counts loss on packets it does not decrypt.
#[derive(Debug, Clone, Default)]
pub struct RtpSeqTracker {
    highest: Option<u64>,
    seq: SeqTracker,
}

/// Where the first extended number starts: far enough from 0 that packets from before
/// the first one (reordered) never underflow.
const RTP_SEQ_ORIGIN: u64 = 1 << 32;

impl RtpSeqTracker {
    /// Records one arrival and classifies it.
    pub fn record(&mut self, seq: u16) -> Arrival {
        let extended = match self.highest {
            None => RTP_SEQ_ORIGIN + u64::from(seq),
            Some(highest) => extend_seq(highest, seq),
        };
        self.highest = Some(self.highest.map_or(extended, |h| h.max(extended)));
        self.seq.record(extended)
    }

    /// The counts so far.
    pub fn tracker(&self) -> &SeqTracker {
        &self.seq
    }
}

/// The 64-bit number closest to `highest` whose low 16 bits are `seq` (RFC 3550
/// appendix A.1's roll-over logic).
fn extend_seq(highest: u64, seq: u16) -> u64 {
    const CYCLE: u64 = 1 << 16;
    let candidate = (highest & !(CYCLE - 1)) | u64::from(seq);
    if candidate > highest && candidate - highest > CYCLE / 2 {
        candidate.saturating_sub(CYCLE)
    } else if candidate < highest && highest - candidate > CYCLE / 2 {
        candidate + CYCLE
    } else {
        candidate
    }
}

/// Nearest-rank percentile of an ascending slice: the smallest value such that at
/// least `p` percent of the samples are less than or equal to it. `None` when empty.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = nearest_rank(sorted.len() as u64, p);
    sorted.get((rank - 1) as usize).copied()
}

/// 1-based nearest rank of percentile `p` among `n > 0` samples.
fn nearest_rank(n: u64, p: f64) -> u64 {
    let p = p.clamp(0.0, 100.0);
    ((p / 100.0 * n as f64).ceil() as u64).clamp(1, n)
}

/// Sub-bucket bits of [`Histogram`]: each power of two is split into 32 buckets, so
/// a reported value is within 1/64 (about 1.6 %) of the true one.
const SUB_BITS: u32 = 5;
const SUB_COUNT: u64 = 1 << SUB_BITS;
/// Values at or above 2^36 (19 hours in microseconds) are clamped into the top bucket.
const MAX_EXP: u32 = 36;
const BUCKETS: usize = ((MAX_EXP - SUB_BITS + 1) as u64 * SUB_COUNT) as usize;

/// Log-linear histogram of `u64` samples (latencies in microseconds) with fixed
/// memory and bounded relative error; values below 64 are exact.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Box<[u64]>,
    count: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            count: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }
}

/// Percentiles and extremes of a [`Histogram`], in the histogram's unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Number of samples.
    pub count: u64,
    /// Exact minimum.
    pub min: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Exact maximum.
    pub max: u64,
    /// Exact mean, rounded down.
    pub mean: u64,
}

impl Histogram {
    /// Adds one sample.
    pub fn record(&mut self, value: u64) {
        self.counts[bucket_of(value)] += 1;
        self.count += 1;
        self.sum += u128::from(value);
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }

    /// Adds all of `other`'s samples (aggregation across tracks or clients).
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Forgets every sample, keeping the allocation.
    pub fn clear(&mut self) {
        self.counts.fill(0);
        self.count = 0;
        self.sum = 0;
        self.min = u64::MAX;
        self.max = 0;
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Nearest-rank percentile, reported as its bucket's midpoint clamped to the exact
    /// min and max. `None` when empty.
    pub fn percentile(&self, p: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = nearest_rank(self.count, p);
        let mut seen = 0;
        for (bucket, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(bucket_mid(bucket).clamp(self.min, self.max));
            }
        }
        Some(self.max)
    }

    /// Count, extremes, mean and the usual percentiles. `None` when empty.
    pub fn summary(&self) -> Option<Summary> {
        Some(Summary {
            count: self.count,
            min: self.min,
            p50: self.percentile(50.0)?,
            p90: self.percentile(90.0)?,
            p99: self.percentile(99.0)?,
            max: self.max,
            mean: (self.sum / u128::from(self.count)) as u64,
        })
    }
}

fn bucket_of(value: u64) -> usize {
    let value = value.min((1 << MAX_EXP) - 1);
    if value < SUB_COUNT {
        return value as usize;
    }
    let exp = 63 - value.leading_zeros();
    let mantissa = (value >> (exp - SUB_BITS)) & (SUB_COUNT - 1);
    ((u64::from(exp - SUB_BITS + 1)) * SUB_COUNT + mantissa) as usize
}

fn bucket_mid(bucket: usize) -> u64 {
    let bucket = bucket as u64;
    if bucket < SUB_COUNT {
        return bucket;
    }
    let exp = (bucket / SUB_COUNT) as u32 + SUB_BITS - 1;
    let mantissa = bucket % SUB_COUNT;
    let width = 1u64 << (exp - SUB_BITS);
    let low = (SUB_COUNT + mantissa) * width;
    low + (width - 1) / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_stream_has_no_loss() {
        let mut t = SeqTracker::default();
        for s in 10..110 {
            assert_eq!(t.record(s), Arrival::InOrder);
        }
        assert_eq!(t.unique(), 100);
        assert_eq!(t.lost(), 0);
        assert_eq!(t.duplicates(), 0);
        assert_eq!(t.reordered(), 0);
    }

    #[test]
    fn gaps_count_as_loss() {
        let mut t = SeqTracker::default();
        for s in [0, 1, 2, 5, 6, 9] {
            t.record(s);
        }
        // 3, 4, 7, 8 missing.
        assert_eq!(t.lost(), 4);
        assert_eq!(t.unique(), 6);
    }

    #[test]
    fn late_packet_fills_gap_and_counts_as_reordered() {
        let mut t = SeqTracker::default();
        assert_eq!(t.record(0), Arrival::InOrder);
        assert_eq!(t.record(2), Arrival::InOrder);
        assert_eq!(t.lost(), 1);
        assert_eq!(t.record(1), Arrival::Reordered);
        assert_eq!(t.lost(), 0);
        assert_eq!(t.reordered(), 1);
        assert_eq!(t.duplicates(), 0);
    }

    #[test]
    fn duplicates_are_not_unique() {
        let mut t = SeqTracker::default();
        t.record(5);
        t.record(6);
        assert_eq!(t.record(6), Arrival::Duplicate);
        assert_eq!(t.record(5), Arrival::Duplicate);
        assert_eq!(t.duplicates(), 2);
        assert_eq!(t.unique(), 2);
        assert_eq!(t.lost(), 0);
    }

    #[test]
    fn packet_before_first_extends_range() {
        let mut t = SeqTracker::default();
        t.record(10);
        assert_eq!(t.record(8), Arrival::Reordered);
        // 9 is now missing.
        assert_eq!(t.lost(), 1);
    }

    #[test]
    fn window_slide_forgets_old_slots() {
        let mut t = SeqTracker::default();
        t.record(0);
        // Same slot as 0 modulo the window: must be new, not a duplicate.
        assert_eq!(t.record(SEQ_WINDOW), Arrival::InOrder);
        assert_eq!(t.record(SEQ_WINDOW - 1), Arrival::Reordered);
        assert_eq!(t.record(0), Arrival::TooOld);
        assert_eq!(t.duplicates(), 0);
        // A big jump clears everything.
        t.record(10 * SEQ_WINDOW);
        assert_eq!(t.record(10 * SEQ_WINDOW - 5), Arrival::Reordered);
        assert_eq!(t.record(10 * SEQ_WINDOW - 5), Arrival::Duplicate);
    }

    #[test]
    fn percentile_nearest_rank() {
        let v: Vec<u64> = (1..=10).collect();
        assert_eq!(percentile(&v, 50.0), Some(5));
        assert_eq!(percentile(&v, 90.0), Some(9));
        assert_eq!(percentile(&v, 91.0), Some(10));
        assert_eq!(percentile(&v, 100.0), Some(10));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn histogram_is_exact_for_small_values() {
        let mut h = Histogram::default();
        for v in 1..=10 {
            h.record(v);
        }
        let s = h.summary().unwrap();
        assert_eq!(s.count, 10);
        assert_eq!(s.min, 1);
        assert_eq!(s.max, 10);
        assert_eq!(s.p50, 5);
        assert_eq!(s.p90, 9);
        assert_eq!(s.p99, 10);
        assert_eq!(s.mean, 5);
    }

    #[test]
    fn histogram_relative_error_is_bounded() {
        let mut h = Histogram::default();
        let mut v: Vec<u64> = (0..1000).map(|i| 1000 + i * 997).collect();
        for &x in &v {
            h.record(x);
        }
        v.sort_unstable();
        for p in [10.0, 50.0, 90.0, 99.0] {
            let exact = percentile(&v, p).unwrap() as f64;
            let approx = h.percentile(p).unwrap() as f64;
            assert!(
                (approx - exact).abs() / exact <= 1.0 / 32.0,
                "p{p}: exact {exact} approx {approx}"
            );
        }
    }

    #[test]
    fn buckets_are_contiguous_and_monotonic() {
        let mut last = 0;
        for v in [
            0u64,
            1,
            31,
            32,
            63,
            64,
            65,
            127,
            128,
            1 << 20,
            (1 << 36) - 1,
        ] {
            let b = bucket_of(v);
            assert!(b >= last, "bucket of {v} went backwards");
            assert!(b < BUCKETS);
            last = b;
        }
        assert_eq!(bucket_of(63), 63);
        assert_eq!(bucket_of(64), 64);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        // The midpoint of a value's bucket maps back to the same bucket.
        for v in [100u64, 5_000, 123_456, 9_999_999] {
            assert_eq!(bucket_of(bucket_mid(bucket_of(v))), bucket_of(v));
        }
    }

    #[test]
    fn rtp_sequence_numbers_extend_across_wraps() {
        let mut t = RtpSeqTracker::default();
        for s in (65_530..=65_535).chain(0..5) {
            assert_eq!(t.record(s), Arrival::InOrder);
        }
        assert_eq!(t.tracker().unique(), 11);
        assert_eq!(t.tracker().lost(), 0);
        // A late packet from before the wrap is reordered, not a jump back by 2^16.
        t.record(10);
        assert_eq!(t.record(65_535), Arrival::Duplicate);
        assert_eq!(t.record(7), Arrival::Reordered);
        assert_eq!(t.tracker().lost(), 4, "5, 6, 8, 9 missing");
        // A stream that starts right after a wrap point can see packets from before it.
        let mut t = RtpSeqTracker::default();
        t.record(1);
        assert_eq!(t.record(65_535), Arrival::Reordered);
        assert_eq!(t.tracker().lost(), 1, "0 missing");
        assert_eq!(extend_seq(5 << 16, 3), (5 << 16) + 3);
        assert_eq!(extend_seq((5 << 16) + 65_000, 10), (6 << 16) + 10);
        assert_eq!(extend_seq((5 << 16) + 10, 65_000), (4 << 16) + 65_000);
    }

    #[test]
    fn histogram_clear_keeps_nothing() {
        let mut h = Histogram::default();
        h.record(7);
        h.record(9_000);
        assert_eq!(h.count(), 2);
        h.clear();
        assert_eq!(h.summary(), None);
        h.record(3);
        assert_eq!(h.summary().map(|s| (s.min, s.max)), Some((3, 3)));
    }

    #[test]
    fn histogram_merge_and_empty() {
        let mut a = Histogram::default();
        assert_eq!(a.summary(), None);
        assert_eq!(a.percentile(50.0), None);
        let mut b = Histogram::default();
        a.record(3);
        b.record(40);
        b.record(50);
        a.merge(&b);
        let s = a.summary().unwrap();
        assert_eq!((s.count, s.min, s.max, s.p50), (3, 3, 50, 40));
    }
}
