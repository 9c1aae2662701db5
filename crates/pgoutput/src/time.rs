//! PostgreSQL timestamps: microseconds since 2000-01-01 00:00:00 UTC.
//!
//! pgoutput sends commit and prepare times in this form. Converting to Unix time is the only
//! thing most users need, and doing it in one place keeps the epoch offset out of callers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds between the Unix epoch (1970-01-01) and PostgreSQL's epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_SECS: i64 = 946_684_800;

/// A PostgreSQL timestamp: microseconds since 2000-01-01 00:00:00 UTC.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PgTimestamp(pub i64);

impl PgTimestamp {
    /// Microseconds since the Unix epoch.
    ///
    /// ```
    /// use pgoutput::PgTimestamp;
    /// assert_eq!(PgTimestamp(0).unix_micros(), 946_684_800_000_000);
    /// ```
    pub fn unix_micros(self) -> i64 {
        self.0.saturating_add(PG_EPOCH_OFFSET_SECS * 1_000_000)
    }

    /// Milliseconds since the Unix epoch (the unit Kafka record timestamps use).
    pub fn unix_millis(self) -> i64 {
        self.unix_micros().div_euclid(1000)
    }

    /// As a [`SystemTime`]; `None` before 1970 (no outbox commit happens then).
    pub fn to_system_time(self) -> Option<SystemTime> {
        let us = u64::try_from(self.unix_micros()).ok()?;
        UNIX_EPOCH.checked_add(Duration::from_micros(us))
    }

    /// The PostgreSQL timestamp of a [`SystemTime`] (saturating at the representable range).
    ///
    /// ```
    /// use std::time::{Duration, UNIX_EPOCH};
    /// use pgoutput::PgTimestamp;
    /// // 2000-01-01 00:00:01 UTC is one second after PostgreSQL's epoch.
    /// let t = UNIX_EPOCH + Duration::from_secs(946_684_801);
    /// assert_eq!(PgTimestamp::from_system_time(t), PgTimestamp(1_000_000));
    /// assert_eq!(PgTimestamp(1_000_000).to_system_time(), Some(t));
    /// ```
    pub fn from_system_time(t: SystemTime) -> Self {
        let unix_us = match t.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
        };
        PgTimestamp(unix_us.saturating_sub(PG_EPOCH_OFFSET_SECS * 1_000_000))
    }

    /// Now, as PostgreSQL would write it (used in standby status updates).
    pub fn now() -> Self {
        Self::from_system_time(SystemTime::now())
    }
}

#[cfg(test)]
mod tests;
