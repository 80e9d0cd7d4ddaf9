//! One lane per callback destination (scheme, host and port): at most `--max-in-flight-per-destination` attempts
//! in flight to it, and the deliveries waiting for a slot of its own, so a slow or hostile destination cannot
//! take the node's request slots from every other destination. (The memory they wait in is the engine's bounded
//! buffer, shared by all lanes.)

use std::collections::{HashMap, VecDeque};

use crate::domain::delivery::DeliveryJob;

/// What to do with a job now.
#[derive(Debug)]
pub(crate) enum Admit {
    /// It has a slot of its destination: send it.
    Go(DeliveryJob),
    /// Its destination is full: it waits in the lane for a slot.
    Wait,
}

#[derive(Default)]
struct Lane {
    in_flight: usize,
    waiting: VecDeque<DeliveryJob>,
}

pub(crate) struct Lanes {
    /// Attempts in flight to one destination at most.
    cap: usize,
    lanes: HashMap<String, Lane>,
}

impl Lanes {
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            lanes: HashMap::new(),
        }
    }

    /// The destination a callback URL names: scheme, host and port (the URL itself when it does not parse: it
    /// fails its attempt anyway, in a lane of its own).
    pub fn destination(url: &str) -> String {
        match url::Url::parse(url) {
            Ok(u) => format!(
                "{}://{}:{}",
                u.scheme(),
                u.host_str().unwrap_or_default(),
                u.port_or_known_default().unwrap_or_default()
            ),
            Err(_) => url.to_string(),
        }
    }

    /// Takes a slot of `dest` for `job`, or queues it for the next.
    pub fn admit(&mut self, dest: &str, job: DeliveryJob) -> Admit {
        let lane = self.lanes.entry(dest.to_string()).or_default();
        if lane.in_flight < self.cap {
            lane.in_flight += 1;
            Admit::Go(job)
        } else {
            lane.waiting.push_back(job);
            Admit::Wait
        }
    }

    /// An attempt to `dest` ended: its slot goes to the next job waiting there, if any (returned, to send).
    pub fn finished(&mut self, dest: &str) -> Option<DeliveryJob> {
        let lane = self.lanes.get_mut(dest)?;
        match lane.waiting.pop_front() {
            Some(next) => Some(next),
            None => {
                lane.in_flight = lane.in_flight.saturating_sub(1);
                if lane.in_flight == 0 {
                    self.lanes.remove(dest);
                }
                None
            }
        }
    }

    /// Every job still waiting (shutdown: their leases are released and they wait in the database).
    pub fn drain_waiting(&mut self) -> usize {
        let n = self.lanes.values().map(|l| l.waiting.len()).sum();
        self.lanes.clear();
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::delivery::Standing;

    fn job(id: i64) -> DeliveryJob {
        DeliveryJob {
            id,
            event_key: "e".into(),
            app_id: 1,
            webhook_key: "w".into(),
            subscription_key: "s".into(),
            url: "https://a.example/hook".into(),
            body: bytes::Bytes::new(),
            own_secret: false,
            attempts: 0,
            lease_until: i64::MAX,
            updated_at: 0,
            standing: Standing::Active,
            routes_seen: 0,
        }
    }

    #[test]
    fn a_destination_gets_its_slots_then_waits() {
        let mut lanes = Lanes::new(2);
        let a = Lanes::destination("https://a.example/hook/1");
        assert_eq!(
            a,
            Lanes::destination("https://a.example:443/other?x=1"),
            "same host and port"
        );
        assert_ne!(
            a,
            Lanes::destination("http://a.example/hook/1"),
            "another scheme and port"
        );
        assert!(matches!(lanes.admit(&a, job(1)), Admit::Go(_)));
        assert!(matches!(lanes.admit(&a, job(2)), Admit::Go(_)));
        assert!(matches!(lanes.admit(&a, job(3)), Admit::Wait));
        // Another destination is not held up by this one.
        let b = Lanes::destination("https://b.example/hook");
        assert!(matches!(lanes.admit(&b, job(5)), Admit::Go(_)));
        // A slot of `a` frees: the waiting job takes it.
        assert_eq!(lanes.finished(&a).map(|j| j.id), Some(3));
        assert!(matches!(lanes.admit(&a, job(6)), Admit::Wait));
        assert_eq!(lanes.finished(&a).map(|j| j.id), Some(6));
        assert!(lanes.finished(&a).is_none());
        assert!(lanes.finished(&a).is_none());
        assert!(!lanes.lanes.contains_key(&a), "an idle lane goes");
        assert!(matches!(lanes.admit(&a, job(7)), Admit::Go(_)));
    }
}
