//! The door of the accept loop: who may connect, decided without blocking the loop, and
//! refusals logged at a bounded rate.
//!
//! A user outside `allowed_groups` can connect in a loop as fast as the kernel lets him.
//! Each refusal must therefore cost almost nothing: the decision comes from the
//! connection's own credentials (`SO_PEERCRED`, `SO_PEERGROUPS`, read by
//! [`qio_platform::local`]), the group database is
//! asked only where the kernel cannot give the groups, on a blocking thread, through a
//! small cache; and the log gets one line per uid per `refusal_log_interval`, the others
//! counted and reported when the interval ends.

use crate::socket::{self, PeerVerdict};
use qio_platform::local::{self, Stream};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Uids whose refusals are counted separately; past it they are counted together.
const MAX_TRACKED_UIDS: usize = 1024;
/// Group-database answers kept; the cache is emptied when full.
const MAX_CACHED_LOOKUPS: usize = 256;
/// How long a group-database answer is kept.
const LOOKUP_TTL: Duration = Duration::from_secs(60);

/// What the accept loop does with a new connection.
pub(crate) enum Door {
    /// Serve it.
    Open,
    /// Drop it (already logged, or counted).
    Shut,
    /// Ask the group database first ([`Gate::ask_database`]), off the loop.
    Ask {
        uid: u32,
        gid: u32,
        pid: Option<i32>,
    },
}

/// The peer check and the refusal log, shared by the accept loop and its lookup tasks.
pub(crate) struct Gate {
    own_uid: u32,
    allowed_gids: Vec<u32>,
    log: Mutex<RefusalLog>,
    cache: Mutex<HashMap<(u32, u32), (Instant, bool)>>,
}

impl Gate {
    pub(crate) fn new(own_uid: u32, allowed_gids: Vec<u32>, interval: Duration) -> Arc<Gate> {
        Arc::new(Gate {
            own_uid,
            allowed_gids,
            log: Mutex::new(RefusalLog::new(interval, MAX_TRACKED_UIDS)),
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Decides on `stream` from its credentials alone; never blocks.
    pub(crate) fn check(&self, stream: &Stream) -> Door {
        let cred = match local::peer(stream) {
            Ok(cred) => cred,
            Err(e) => {
                tracing::warn!("refused a local client whose credentials cannot be read: {e}");
                return Door::Shut;
            }
        };
        let (uid, gid, pid) = (cred.uid, cred.gid, cred.pid);
        // Asked only when the uid and primary group are not enough.
        let needs_groups = uid != self.own_uid && uid != 0 && !self.allowed_gids.is_empty();
        let groups = needs_groups.then(|| local::peer_groups(stream)).flatten();
        match socket::peer_verdict(
            uid,
            gid,
            groups.as_deref(),
            self.own_uid,
            &self.allowed_gids,
        ) {
            PeerVerdict::Allowed => Door::Open,
            PeerVerdict::Refused => {
                self.refused(uid, pid);
                Door::Shut
            }
            PeerVerdict::AskDatabase => {
                let cached = self.cached(uid, gid, Instant::now());
                match cached {
                    Some(true) => Door::Open,
                    Some(false) => {
                        self.refused(uid, pid);
                        Door::Shut
                    }
                    None => Door::Ask { uid, gid, pid },
                }
            }
        }
    }

    /// The fallback where the kernel cannot tell a peer's groups: the group database, on a
    /// blocking thread, remembered for a minute.
    pub(crate) async fn ask_database(
        self: Arc<Self>,
        uid: u32,
        gid: u32,
        pid: Option<i32>,
    ) -> bool {
        let allowed = self.allowed_gids.clone();
        let ok = tokio::task::spawn_blocking(move || {
            socket::peer_allowed_by_database(uid, gid, &allowed)
        })
        .await
        .unwrap_or(false);
        {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() >= MAX_CACHED_LOOKUPS {
                cache.clear();
            }
            cache.insert((uid, gid), (Instant::now(), ok));
        }
        if !ok {
            self.refused(uid, pid);
        }
        ok
    }

    fn cached(&self, uid: u32, gid: u32, now: Instant) -> Option<bool> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(&(uid, gid))
            .filter(|(at, _)| now.duration_since(*at) < LOOKUP_TTL)
            .map(|(_, ok)| *ok)
    }

    fn refused(&self, uid: u32, pid: Option<i32>) {
        let line = self
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .refused(uid, Instant::now());
        if let Some(earlier) = line {
            let why = socket::refusal_reason(uid, pid, self.own_uid, &self.allowed_gids);
            if earlier > 0 {
                tracing::warn!(
                    uid,
                    pid,
                    "refused a local client: {why} ({earlier} more refusals of this uid before)"
                );
            } else {
                tracing::warn!(uid, pid, "refused a local client: {why}");
            }
        }
    }

    /// Logs the refusals counted but not logged whose interval has ended.
    pub(crate) fn flush(&self) {
        let counts = self
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush(Instant::now());
        for (uid, count, over) in counts {
            match uid {
                Some(uid) => tracing::warn!(
                    uid,
                    count,
                    "refused {count} more connections of uid {uid} in the last {}s",
                    over.as_secs_f64()
                ),
                None => tracing::warn!(
                    count,
                    "refused {count} more connections of other uids in the last {}s",
                    over.as_secs_f64()
                ),
            }
        }
    }

    /// How often [`Gate::flush`] should run.
    pub(crate) fn flush_interval(&self) -> Duration {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).interval
    }
}

/// Refusals per uid: the first in an interval is logged, the rest counted.
#[derive(Debug)]
struct RefusalLog {
    interval: Duration,
    max_uids: usize,
    /// Per uid: when its last line was written, and the refusals since.
    by_uid: HashMap<u32, (Instant, u64)>,
    /// Refusals of uids beyond `max_uids`, and since when.
    others: Option<(Instant, u64)>,
}

impl RefusalLog {
    fn new(interval: Duration, max_uids: usize) -> RefusalLog {
        RefusalLog {
            interval,
            max_uids,
            by_uid: HashMap::new(),
            others: None,
        }
    }

    /// Counts a refusal of `uid`; `Some(n)` when it is to be logged now, `n` being the
    /// refusals counted since the last line.
    fn refused(&mut self, uid: u32, now: Instant) -> Option<u64> {
        if let Some((since, count)) = self.by_uid.get_mut(&uid) {
            if now.duration_since(*since) < self.interval {
                *count += 1;
                return None;
            }
            let earlier = *count;
            *since = now;
            *count = 0;
            return Some(earlier);
        }
        if self.by_uid.len() >= self.max_uids {
            let (_, count) = self.others.get_or_insert((now, 0));
            *count += 1;
            return None;
        }
        self.by_uid.insert(uid, (now, 0));
        Some(0)
    }

    /// The counts whose interval has ended: (uid or `None` for the others, count, over how
    /// long). Uids quiet for a whole interval are forgotten.
    fn flush(&mut self, now: Instant) -> Vec<(Option<u32>, u64, Duration)> {
        let mut out = Vec::new();
        let interval = self.interval;
        self.by_uid.retain(|&uid, (since, count)| {
            let over = now.duration_since(*since);
            if over < interval {
                return true;
            }
            if *count == 0 {
                return false;
            }
            out.push((Some(uid), *count, over));
            *since = now;
            *count = 0;
            true
        });
        if let Some((since, count)) = self.others {
            let over = now.duration_since(since);
            if over >= interval {
                out.push((None, count, over));
                self.others = None;
            }
        }
        out.sort_by_key(|(uid, _, _)| *uid);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_database_fallback_is_asked_once_then_cached() {
        // Root's database groups include 0; a uid nobody has is in none.
        let gate = Gate::new(4242, vec![0], Duration::from_secs(60));
        assert!(gate.cached(0, 0, Instant::now()).is_none());
        assert!(gate.clone().ask_database(0, 0, None).await);
        assert_eq!(gate.cached(0, 0, Instant::now()), Some(true));
        let stranger = u32::MAX - 7;
        assert!(!gate.clone().ask_database(stranger, stranger, Some(1)).await);
        assert_eq!(gate.cached(stranger, stranger, Instant::now()), Some(false));
        // Kept for LOOKUP_TTL only.
        let later = Instant::now() + LOOKUP_TTL;
        assert_eq!(gate.cached(stranger, stranger, later), None);
        // The refusal was counted in the log.
        let log = gate.log.lock().unwrap();
        assert!(log.by_uid.contains_key(&stranger));
    }

    #[tokio::test]
    async fn a_peer_of_our_own_uid_is_let_in_from_its_credentials() {
        let (a, _b) = local::pair().unwrap();
        let own = qio_platform::users::own_euid();
        let gate = Gate::new(own, Vec::new(), Duration::from_secs(60));
        assert!(matches!(gate.check(&a), Door::Open));
        let gate = Gate::new(own.wrapping_add(1), Vec::new(), Duration::from_secs(60));
        // Root is always let in; anyone else without allowed groups is not.
        let expect_open = own == 0;
        assert_eq!(matches!(gate.check(&a), Door::Open), expect_open);
    }

    #[test]
    fn one_line_per_uid_per_interval_and_every_refusal_counted() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut log = RefusalLog::new(10 * s, 2);
        assert_eq!(log.refused(7, t0), Some(0));
        for _ in 0..999 {
            assert_eq!(log.refused(7, t0 + s), None);
        }
        assert_eq!(log.refused(8, t0 + s), Some(0));
        assert!(log.flush(t0 + 9 * s).is_empty(), "not yet");
        assert_eq!(log.flush(t0 + 10 * s), vec![(Some(7), 999, 10 * s)]);
        // Then one line per interval while it goes on, and the next after a pause.
        assert_eq!(log.refused(7, t0 + 11 * s), None);
        assert_eq!(log.refused(7, t0 + 20 * s), Some(1));
        // A quiet uid is forgotten; the table is bounded.
        assert_eq!(log.flush(t0 + 40 * s), vec![]);
        assert!(log.by_uid.is_empty());
        log.refused(1, t0 + 41 * s);
        log.refused(2, t0 + 41 * s);
        assert_eq!(log.refused(3, t0 + 41 * s), None);
        assert_eq!(log.refused(4, t0 + 41 * s), None);
        assert_eq!(log.by_uid.len(), 2);
        assert_eq!(log.flush(t0 + 51 * s), vec![(None, 2, 10 * s)]);
    }
}
