//! The two streams a client hands out: a subscription's events and the connection events.

use crate::queue::Ring;
use crate::shared::{Common, RawEvent, Shared, SlotGuard};
use crate::types::{ConnectionEvent, Event};
use futures_util::Stream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// The events of one subscription, as a [`Stream`]; dropping it unsubscribes.
///
/// Made by [`Client::on`](crate::Client::on), [`Client::on_with_data`](crate::Client::on_with_data)
/// and [`Client::one`](crate::Client::one). The stream ends (yields `None`) after its one
/// event for `one`, after [`Client::off`](crate::Client::off) on its path, when the server
/// refuses it on a re-subscription after a reconnect, and when the client is closed. It
/// survives daemon restarts: the client subscribes again on its own.
///
/// Each subscription buffers up to the builder's `subscription_buffer` events (1024 by
/// default). A program that reads slower than events arrive loses the oldest ones, never
/// slowing the other subscriptions: [`Subscription::lost`] counts them, and each gap is
/// reported on [`Client::events`](crate::Client::events) as `Lost { path: Some(..) }` when
/// the program reads past it.
///
/// A subscription keeps its client's connection alive even when every [`Client`](crate::Client)
/// clone is dropped.
///
/// ```no_run
/// use futures_util::StreamExt;
/// # async fn demo(client: qio_client::Client) -> Result<(), qio_client::Error> {
/// let mut news = client.on("/news").await?;
/// while let Some(ev) = news.next().await {
///     println!("{}: {}", ev.path, ev.data);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Subscription {
    // Dropped first: the slot is released before this handle's share of the mailbox goes.
    _slot: SlotGuard,
    path: String,
    ring: Arc<Ring<RawEvent>>,
    shared: Arc<Shared>,
}

impl Subscription {
    pub(crate) fn new(
        path: String,
        ring: Arc<Ring<RawEvent>>,
        slot: SlotGuard,
        shared: Arc<Shared>,
    ) -> Self {
        Subscription {
            _slot: slot,
            path,
            ring,
            shared,
        }
    }

    /// The subscribed path, cleaned (events carry this form).
    ///
    /// ```no_run
    /// # async fn demo(client: qio_client::Client) -> Result<(), qio_client::Error> {
    /// let sub = client.on("news/").await?;
    /// assert_eq!(sub.path(), "/news");
    /// # Ok(()) }
    /// ```
    pub fn path(&self) -> &str {
        &self.path
    }

    /// How many events this subscription dropped because they were not read in time.
    ///
    /// ```no_run
    /// # async fn demo(sub: qio_client::Subscription) {
    /// if sub.lost() > 0 {
    ///     eprintln!("{} fell behind by {} events", sub.path(), sub.lost());
    /// }
    /// # }
    /// ```
    pub fn lost(&self) -> u64 {
        self.ring.lost()
    }

    /// The next event; `None` once the subscription has ended. The same as
    /// `StreamExt::next`, without importing anything.
    ///
    /// ```no_run
    /// # async fn demo(client: qio_client::Client) -> Result<(), qio_client::Error> {
    /// let mut sub = client.on("/news").await?;
    /// if let Some(ev) = sub.recv().await {
    ///     println!("{}", ev.data);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn recv(&mut self) -> Option<Event> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }
}

impl Stream for Subscription {
    type Item = Event;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        let this = self.get_mut();
        this.ring.poll_pop(cx).map(|next| {
            next.map(|(raw, lost)| {
                if lost > 0 {
                    this.shared.common.publish(ConnectionEvent::Lost {
                        count: lost,
                        path: Some(this.path.clone()),
                    });
                }
                Event::from_raw(raw, &this.shared)
            })
        })
    }
}

/// The connection events of a client, as a [`Stream`], from [`Client::events`](crate::Client::events).
///
/// The first item is the current state (`Open`, `Close` or `DaemonGone`); changes follow.
/// Each stream buffers up to 256 events; beyond that the oldest are dropped and counted in
/// [`ConnectionEvents::missed`]. The stream ends when the client is closed, or when every
/// handle of it ([`Client`](crate::Client) clones, subscriptions, callback handles) is gone.
/// It does not keep the client alive.
///
/// ```no_run
/// use qio_client::ConnectionEvent;
/// # async fn demo(client: qio_client::Client) {
/// let mut events = client.events();
/// while let Some(ev) = events.recv().await {
///     match ev {
///         ConnectionEvent::DaemonGone { reason } => eprintln!("qiod went away: {reason}"),
///         ConnectionEvent::DaemonBack { after, .. } => eprintln!("qiod back after {after:?}"),
///         other => eprintln!("{other:?}"),
///     }
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct ConnectionEvents {
    ring: Arc<Ring<ConnectionEvent>>,
    missed: u64,
}

impl ConnectionEvents {
    pub(crate) fn new(common: &Common) -> Self {
        ConnectionEvents {
            ring: common.subscribe(),
            missed: 0,
        }
    }

    /// The next connection event; `None` once the client is gone.
    ///
    /// ```no_run
    /// # async fn demo(client: qio_client::Client) {
    /// let mut events = client.events();
    /// let now = events.recv().await; // the current state
    /// # }
    /// ```
    pub async fn recv(&mut self) -> Option<ConnectionEvent> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }

    /// The next connection event if one is waiting, without waiting.
    ///
    /// ```no_run
    /// # fn demo(client: qio_client::Client) {
    /// let mut events = client.events();
    /// while let Some(ev) = events.try_recv() {
    ///     println!("{ev:?}");
    /// }
    /// # }
    /// ```
    pub fn try_recv(&mut self) -> Option<ConnectionEvent> {
        let (ev, lost) = self.ring.try_pop()?;
        self.missed += lost;
        Some(ev)
    }

    /// How many connection events this stream dropped because it was not read in time.
    ///
    /// ```no_run
    /// # fn demo(events: qio_client::ConnectionEvents) {
    /// assert_eq!(events.missed(), 0);
    /// # }
    /// ```
    pub fn missed(&self) -> u64 {
        self.missed
    }
}

impl Stream for ConnectionEvents {
    type Item = ConnectionEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ConnectionEvent>> {
        let this = self.get_mut();
        this.ring.poll_pop(cx).map(|next| {
            next.map(|(ev, lost)| {
                this.missed += lost;
                ev
            })
        })
    }
}
