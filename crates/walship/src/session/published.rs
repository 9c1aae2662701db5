//! What this source already published, judged against the server's history: the check after
//! a promotion, and the timeline each record names.
//!
//! Owns reading topics back before the first record when [`Session::check_published`] asks
//! for it, judging every read-back (this one and the resume lookup's) against the server's
//! history, and choosing each record's [`walship_kafka::TIMELINE_HEADER`] value.
//!
//! Invariant: a session never publishes after finding a record of its source outside the
//! server's history ([`Error::Fork`]): whatever would take such a record's position stops it
//! first. A record names the timeline whose WAL holds its commit, an ancestor's for what a
//! promoted server reads again from before it branched.

use std::sync::Arc;
use std::time::Duration;

use pgoutput::Lsn;
use tokio_util::sync::CancellationToken;

use super::Session;
use super::seams::{EventSink, WalSource};
use crate::error::Error;

/// Longest the check after a promotion reads topics back ([`Session::check_published`]).
const PUBLISHED_CHECK_BUDGET: Duration = Duration::from_secs(60);

impl<W: WalSource, K: EventSink> Session<W, K> {
    /// The check [`Session::check_published`] asks for, if any: each topic read back, its
    /// findings judged against the history and kept for the resume lookup.
    ///
    /// Records a promotion can have left behind are the newest of this source in their
    /// partitions (nothing of it was published after them), and a read-back reads each
    /// partition from its end: what a scan cut short by its limits or by
    /// [`PUBLISHED_CHECK_BUDGET`] did not read is older. Such topics are named in a warning;
    /// they do not hold the pipeline back for ever.
    pub(super) async fn read_published(&mut self, cancel: &CancellationToken) -> Result<(), Error> {
        let Some((topics, since, lineage)) = self.published_check.take() else {
            return Ok(());
        };
        let until = std::time::Instant::now() + PUBLISHED_CHECK_BUDGET;
        let mut partly = Vec::new();
        for topic in &topics {
            if std::time::Instant::now() >= until {
                partly.push(topic.as_str());
                continue;
            }
            let started = std::time::Instant::now();
            // The resume lookup keeps what it may hold of this read; the check itself needs
            // only the timelines, which are counted whatever the limit.
            let for_resume = match self.resume.as_mut() {
                Some(r) if r.since() == since && !r.knows(topic) => r.begin_scan(topic),
                _ => None,
            };
            let scan = self
                .sink
                .read_back(topic, &self.source_id, since, for_resume.unwrap_or(1));
            let what = format!("reading topic {topic:?} back to check the promotion");
            let Some(found) = self.await_broker(&what, scan, cancel, true).await? else {
                return Ok(());
            };
            let found = found.map_err(|e| Error::PublishedUnread {
                what: format!("reading topic {topic:?} back"),
                error: e.message,
                denied: e.denied,
            })?;
            self.check_history(topic, &found)?;
            if !found.complete {
                partly.push(topic.as_str());
            }
            if let (Some(_), Some(resume)) = (for_resume, self.resume.as_mut()) {
                resume.store(topic, Ok(found), started.elapsed());
            }
        }
        lineage.checked();
        if !partly.is_empty() {
            tracing::warn!(
                topics = partly.len(),
                "after a promotion, {} of {} topics were read back only in part (the newest \
                 records of each partition first, within {} s in all): {}{}; records this server \
                 lacks would be the newest of this source, so these were looked for first, but \
                 older records there were not judged",
                partly.len(),
                topics.len(),
                PUBLISHED_CHECK_BUDGET.as_secs(),
                partly
                    .iter()
                    .take(10)
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", "),
                if partly.len() > 10 { ", …" } else { "" }
            );
        }
        tracing::info!(
            topics = topics.len(),
            server = %self.server,
            timeline = self.history.timeline,
            "checked what Kafka holds of this source since {since}: all of it is in this \
             server's history"
        );
        Ok(())
    }

    /// [`Error::Fork`] when `found` (records of this source read back from `topic`) holds a
    /// record outside the server's history. Records without a timeline (written by an earlier
    /// version) cannot be judged and pass.
    pub(super) fn check_history(
        &self,
        topic: &str,
        found: &walship_kafka::Delivered,
    ) -> Result<(), Error> {
        let history = &self.history;
        for (timeline, span) in found.timelines() {
            if history.holds(timeline, Lsn(span.last.commit_lsn)) {
                continue;
            }
            let ended = history
                .switches
                .iter()
                .find(|s| s.timeline == timeline && timeline != history.timeline)
                .map(|s| s.end);
            return Err(Error::Fork {
                walship_source: self.source_id.to_string(),
                server: self.server.to_string(),
                timeline: history.timeline,
                branch: history.branch_point(),
                topic: topic.to_owned(),
                records: span.records,
                first: span.first,
                last: span.last,
                record_timeline: timeline,
                ended,
                published_before: self.stats.events_sent,
                next_epoch: self.source_epoch + 1,
            });
        }
        Ok(())
    }

    /// The [`walship_kafka::TIMELINE_HEADER`] value for an event committed at `commit_lsn`:
    /// the timeline whose WAL holds it — an ancestor's for what a promoted server reads again
    /// from before it branched.
    pub(super) fn timeline_text(&self, commit_lsn: Lsn) -> Arc<str> {
        self.timeline_texts
            .iter()
            .find(|(end, _)| commit_lsn < *end)
            .map_or_else(|| Arc::clone(&self.timeline_text), |(_, t)| Arc::clone(t))
    }
}
