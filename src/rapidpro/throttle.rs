//! Client-side request budgets per RapidPro throttle scope.
//!
//! Owns the process-wide pacing of RapidPro requests. RapidPro throttles
//! each workspace per scope (`v2`, `v2.contacts`, `v2.messages`,
//! `v2.runs`) with a sliding window of N requests per hour (reference §4).
//! [`Throttle`] keeps one token bucket per scope, shared by every clone
//! (so by every task), refilled at the configured rate per hour with a
//! burst of one minute's worth. [`Throttle::acquire`] waits until a token
//! is available; [`Throttle::pause_until`] stops a whole scope until an
//! instant, which is how a 429's `Retry-After` reaches every task.
//! All waiting uses `tokio::time`, so tests can pause and advance time.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::RapidProRates;

/// RapidPro's default rate for every scope.
pub const DEFAULT_RATE_PER_HOUR: u32 = 3600;

/// A RapidPro throttle scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// `v2`: every endpoint not listed below.
    V2,
    /// `v2.contacts`: `/contacts.json` (all methods).
    Contacts,
    /// `v2.messages`: `/messages.json`.
    Messages,
    /// `v2.runs`: `/runs.json`.
    Runs,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::V2, Scope::Contacts, Scope::Messages, Scope::Runs];

    /// The scope's name in RapidPro (`v2.contacts`).
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::V2 => "v2",
            Scope::Contacts => "v2.contacts",
            Scope::Messages => "v2.messages",
            Scope::Runs => "v2.runs",
        }
    }

    fn index(self) -> usize {
        match self {
            Scope::V2 => 0,
            Scope::Contacts => 1,
            Scope::Messages => 2,
            Scope::Runs => 3,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug)]
struct Bucket {
    rate_per_hour: u32,
    capacity: f64,
    tokens: f64,
    refilled_at: Instant,
    paused_until: Option<Instant>,
}

impl Bucket {
    fn new(rate_per_hour: u32, now: Instant) -> Self {
        let rate_per_hour = rate_per_hour.max(1);
        // One minute's worth, at least one token.
        let capacity = (f64::from(rate_per_hour) / 60.0).floor().max(1.0);
        Bucket {
            rate_per_hour,
            capacity,
            tokens: capacity,
            refilled_at: now,
            paused_until: None,
        }
    }

    fn per_second(&self) -> f64 {
        f64::from(self.rate_per_hour) / 3600.0
    }

    fn refill(&mut self, now: Instant) {
        if now > self.refilled_at {
            let elapsed = (now - self.refilled_at).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.per_second()).min(self.capacity);
            self.refilled_at = now;
        }
    }

    /// Take a token, or say how long to wait before trying again.
    fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        if let Some(until) = self.paused_until {
            if now < until {
                return Err(until - now);
            }
            self.paused_until = None;
        }
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        let missing = 1.0 - self.tokens;
        let wait = Duration::from_secs_f64(missing / self.per_second());
        Err(wait.max(Duration::from_millis(1)))
    }
}

/// The shared request budgets of one RapidPro workspace. Clones share the
/// same buckets.
#[derive(Clone)]
pub struct Throttle {
    buckets: Arc<[Mutex<Bucket>; 4]>,
}

impl fmt::Debug for Throttle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_map();
        for scope in Scope::ALL {
            match self.buckets[scope.index()].try_lock() {
                Ok(bucket) => list.entry(&scope.as_str(), &bucket.rate_per_hour),
                Err(_) => list.entry(&scope.as_str(), &"(busy)"),
            };
        }
        list.finish()
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new(&RapidProRates::default())
    }
}

impl Throttle {
    /// Budgets at the configured rates (requests per hour per scope; 0 is
    /// treated as 1).
    pub fn new(rates: &RapidProRates) -> Self {
        let now = Instant::now();
        Throttle {
            buckets: Arc::new([
                Mutex::new(Bucket::new(rates.v2, now)),
                Mutex::new(Bucket::new(rates.contacts, now)),
                Mutex::new(Bucket::new(rates.messages, now)),
                Mutex::new(Bucket::new(rates.runs, now)),
            ]),
        }
    }

    /// The same rate for every scope.
    pub fn uniform(rate_per_hour: u32) -> Self {
        Throttle::new(&RapidProRates {
            v2: rate_per_hour,
            contacts: rate_per_hour,
            messages: rate_per_hour,
            runs: rate_per_hour,
        })
    }

    /// Wait until `scope` has a token (and is not paused), and take it.
    pub async fn acquire(&self, scope: Scope) {
        loop {
            let wait = {
                let mut bucket = self.buckets[scope.index()].lock().await;
                match bucket.try_take(Instant::now()) {
                    Ok(()) => return,
                    Err(wait) => wait,
                }
            };
            tracing::debug!(
                scope = scope.as_str(),
                wait_ms = wait.as_millis() as u64,
                "waiting for the RapidPro request budget"
            );
            tokio::time::sleep(wait).await;
        }
    }

    /// Take a token if one is available now.
    pub async fn try_acquire(&self, scope: Scope) -> bool {
        let mut bucket = self.buckets[scope.index()].lock().await;
        bucket.try_take(Instant::now()).is_ok()
    }

    /// Stop every request of `scope` until `until` (RapidPro said 429).
    /// A later pause wins over an earlier one; an earlier one never
    /// shortens a pause in force. The bucket restarts with one token.
    pub async fn pause_until(&self, scope: Scope, until: Instant) {
        let mut bucket = self.buckets[scope.index()].lock().await;
        let until = match bucket.paused_until {
            Some(current) if current > until => current,
            _ => until,
        };
        bucket.paused_until = Some(until);
        bucket.tokens = 1.0;
        bucket.refilled_at = until;
    }

    /// When the pause of `scope` ends, if it is paused now.
    pub async fn paused_until(&self, scope: Scope) -> Option<Instant> {
        let bucket = self.buckets[scope.index()].lock().await;
        bucket.paused_until.filter(|until| *until > Instant::now())
    }

    /// The configured rate of `scope`, per hour.
    pub async fn rate_per_hour(&self, scope: Scope) -> u32 {
        self.buckets[scope.index()].lock().await.rate_per_hour
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rates(v2: u32, contacts: u32) -> RapidProRates {
        RapidProRates {
            v2,
            contacts,
            messages: 3600,
            runs: 3600,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_the_configured_rate() {
        // 120/hour: a burst of 2, then one every 30 s.
        let throttle = Throttle::new(&rates(120, 3600));
        let start = Instant::now();
        throttle.acquire(Scope::V2).await;
        throttle.acquire(Scope::V2).await;
        assert_eq!(Instant::now(), start, "the burst does not wait");
        throttle.acquire(Scope::V2).await;
        let waited = Instant::now() - start;
        assert!(
            waited >= Duration::from_secs(29) && waited <= Duration::from_secs(31),
            "{waited:?}"
        );
        throttle.acquire(Scope::V2).await;
        let waited = Instant::now() - start;
        assert!(
            waited >= Duration::from_secs(59) && waited <= Duration::from_secs(61),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn scopes_are_independent() {
        let throttle = Throttle::new(&rates(60, 60));
        throttle.acquire(Scope::V2).await;
        assert!(!throttle.try_acquire(Scope::V2).await);
        assert!(throttle.try_acquire(Scope::Contacts).await);
        assert!(throttle.try_acquire(Scope::Runs).await);
        assert_eq!(throttle.rate_per_hour(Scope::Contacts).await, 60);
    }

    #[tokio::test(start_paused = true)]
    async fn clones_share_one_budget_across_tasks() {
        let throttle = Throttle::new(&rates(60, 3600)); // 1 per minute, burst 1
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..3 {
            let t = throttle.clone();
            tasks.push(tokio::spawn(async move {
                t.acquire(Scope::V2).await;
                Instant::now()
            }));
        }
        let mut done = Vec::new();
        for task in tasks {
            done.push(task.await.unwrap() - start);
        }
        done.sort();
        assert_eq!(done[0], Duration::ZERO);
        assert!(done[1] >= Duration::from_secs(59), "{done:?}");
        assert!(done[2] >= Duration::from_secs(119), "{done:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_stops_the_scope_for_every_task() {
        let throttle = Throttle::default();
        let start = Instant::now();
        throttle
            .pause_until(Scope::Contacts, start + Duration::from_secs(10))
            .await;
        // An earlier pause does not shorten it.
        throttle
            .pause_until(Scope::Contacts, start + Duration::from_secs(2))
            .await;
        assert_eq!(
            throttle.paused_until(Scope::Contacts).await,
            Some(start + Duration::from_secs(10))
        );
        assert!(throttle.try_acquire(Scope::V2).await, "other scopes run");
        let other = throttle.clone();
        let task = tokio::spawn(async move {
            other.acquire(Scope::Contacts).await;
            Instant::now()
        });
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!task.is_finished());
        let resumed = task.await.unwrap();
        assert!(resumed >= start + Duration::from_secs(10));
        assert_eq!(throttle.paused_until(Scope::Contacts).await, None);
    }

    #[test]
    fn scope_names_are_rapidpro_names() {
        let names: Vec<_> = Scope::ALL.iter().map(|s| s.to_string()).collect();
        assert_eq!(names, ["v2", "v2.contacts", "v2.messages", "v2.runs"]);
        assert!(format!("{:?}", Throttle::default()).contains("v2.runs"));
    }
}
