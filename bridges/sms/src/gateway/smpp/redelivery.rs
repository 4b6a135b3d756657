//! Recognising a `deliver_sm` the SMSC delivers again.
//!
//! A `deliver_sm` carries no id of its own, and an SMSC delivers one again when it did not get
//! a successful `deliver_sm_resp`: we answered with an error, answered too late, or the session
//! broke before our answer arrived. Each `deliver_sm` body is remembered (by digest) with the id
//! its message was given and what became of our answer, so that:
//!
//! - one we **did not answer successfully** is handled again under the *same* id (the bridge's
//!   idempotency then finishes what is missing, or nothing);
//! - one we answered successfully but **perhaps too late or on a session that broke soon after**
//!   is only answered again (the message is already in Matrix);
//! - one we answered successfully in time on a session that lived on is a **new message** with
//!   the same content (the phone sent the same text again).
//!
//! Parts of concatenated messages still incomplete and delivery receipts are simply handled
//! again: buffering a part twice or acting on a receipt twice changes nothing.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

/// How long a `deliver_sm` is remembered.
const MEMORY: Duration = Duration::from_secs(24 * 3600);
/// Most `deliver_sm` remembered (the oldest are forgotten first).
const MAX_REMEMBERED: usize = 10_000;

/// A digest of a `deliver_sm` body.
pub type Digest = [u8; 20];

/// The digest of a `deliver_sm` body (everything but the PDU header, whose sequence number
/// changes when the SMSC delivers it again).
pub fn digest(body: &[u8]) -> Digest {
    use sha1::Digest as _;
    sha1::Sha1::digest(body).into()
}

/// A `deliver_sm` seen.
#[derive(Debug, Clone)]
struct Seen {
    /// The id its message was handed to the bridge under (`None`: a buffered part).
    gateway_id: Option<String>,
    /// The session it arrived on.
    session: u64,
    /// When it arrived.
    received: Instant,
    /// When it was answered successfully; `None`: not (yet) answered successfully.
    answered: Option<Instant>,
}

/// What a `deliver_sm` is, given what was seen before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not seen (or a new message with the same content): handle it with a new id.
    New,
    /// Delivered again after we failed to answer it successfully: handle it again, under the
    /// id its message got.
    Again(String),
    /// Delivered again although we handled it and answered: our answer was late or lost, so
    /// only answer again.
    AlreadyHandled,
}

/// The `deliver_sm` seen recently, across sessions.
#[derive(Debug, Default)]
pub struct Redeliveries {
    seen: HashMap<Digest, Seen>,
    order: VecDeque<Digest>,
    /// When each session ended.
    ended: HashMap<u64, Instant>,
}

impl Redeliveries {
    /// What the `deliver_sm` with digest `d` is. `timeout` is how long the SMSC waits for an
    /// answer (our `response_timeout`).
    pub fn verdict(&self, d: &Digest, now: Instant, timeout: Duration) -> Verdict {
        let Some(seen) = self.seen.get(d) else { return Verdict::New };
        if now.duration_since(seen.received) > MEMORY {
            return Verdict::New;
        }
        match (&seen.gateway_id, seen.answered) {
            (None, _) => Verdict::New,
            (Some(id), None) => Verdict::Again(id.clone()),
            (Some(_), Some(at)) => {
                let late = at.duration_since(seen.received) > timeout;
                let cut_off = self
                    .ended
                    .get(&seen.session)
                    .is_some_and(|end| end.duration_since(at) <= timeout);
                if late || cut_off { Verdict::AlreadyHandled } else { Verdict::New }
            }
        }
    }

    /// Remembers that `d` arrived on `session` and is being handled, under `gateway_id` if it
    /// completes a message.
    pub fn arrived(&mut self, d: Digest, session: u64, gateway_id: Option<String>, now: Instant) {
        if self.seen.len() >= MAX_REMEMBERED
            && !self.seen.contains_key(&d)
            && let Some(oldest) = self.order.pop_front()
        {
            self.seen.remove(&oldest);
        }
        if !self.seen.contains_key(&d) {
            self.order.push_back(d);
        }
        self.seen.insert(d, Seen { gateway_id, session, received: now, answered: None });
    }

    /// Remembers that `d` was answered successfully.
    pub fn answered(&mut self, d: &Digest, now: Instant) {
        if let Some(seen) = self.seen.get_mut(d) {
            seen.answered = Some(now);
        }
    }

    /// Remembers that `session` ended.
    pub fn session_ended(&mut self, session: u64, now: Instant) {
        self.ended.retain(|_, at| now.duration_since(*at) <= MEMORY);
        self.ended.insert(session, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);

    #[test]
    fn verdicts() {
        let mut r = Redeliveries::default();
        let (a, b, c) = (digest(b"a"), digest(b"b"), digest(b"c"));
        let t0 = Instant::now();
        assert_eq!(r.verdict(&a, t0, TIMEOUT), Verdict::New);

        // Failed (answered with an error): handled again under the same id.
        r.arrived(a, 1, Some("smpp-1".into()), t0);
        assert_eq!(r.verdict(&a, t0, TIMEOUT), Verdict::Again("smpp-1".into()));

        // Answered in time on a session that lives on: the same text again is a new message.
        r.answered(&a, t0 + Duration::from_secs(1));
        assert_eq!(r.verdict(&a, t0 + Duration::from_secs(60), TIMEOUT), Verdict::New);

        // Answered too late: the SMSC gave up waiting; only answer again.
        r.arrived(b, 1, Some("smpp-2".into()), t0);
        r.answered(&b, t0 + Duration::from_secs(11));
        assert_eq!(r.verdict(&b, t0 + Duration::from_secs(20), TIMEOUT), Verdict::AlreadyHandled);

        // Answered, then the session broke at once: the answer may be lost.
        r.arrived(c, 2, Some("smpp-3".into()), t0);
        r.answered(&c, t0 + Duration::from_secs(1));
        r.session_ended(2, t0 + Duration::from_secs(2));
        assert_eq!(r.verdict(&c, t0 + Duration::from_secs(5), TIMEOUT), Verdict::AlreadyHandled);
        // a's session (1) ends much later than its answer: still a new message.
        r.session_ended(1, t0 + Duration::from_secs(100));
        assert_eq!(r.verdict(&a, t0 + Duration::from_secs(101), TIMEOUT), Verdict::New);

        // Forgotten after a day.
        assert_eq!(r.verdict(&c, t0 + MEMORY + Duration::from_secs(1), TIMEOUT), Verdict::New);

        // A buffered part or a receipt (no message id): always handled again.
        let part = digest(b"part");
        r.arrived(part, 3, None, t0);
        assert_eq!(r.verdict(&part, t0, TIMEOUT), Verdict::New);
        r.answered(&part, t0);
        r.session_ended(3, t0);
        assert_eq!(r.verdict(&part, t0, TIMEOUT), Verdict::New);
    }

    #[test]
    fn memory_is_bounded() {
        let mut r = Redeliveries::default();
        let now = Instant::now();
        for n in 0..(MAX_REMEMBERED + 5) {
            r.arrived(digest(&n.to_be_bytes()), 1, Some(format!("m{n}")), now);
        }
        assert_eq!(r.seen.len(), MAX_REMEMBERED);
        assert_eq!(r.order.len(), MAX_REMEMBERED);
        assert_eq!(r.verdict(&digest(&0usize.to_be_bytes()), now, TIMEOUT), Verdict::New);
        assert_eq!(
            r.verdict(&digest(&(MAX_REMEMBERED + 4).to_be_bytes()), now, TIMEOUT),
            Verdict::Again(format!("m{}", MAX_REMEMBERED + 4))
        );
    }
}
