//! The reservation service: the one place where a request becomes a script call and a
//! script reply becomes an outcome. The state machine itself lives in `lua/lib.lua`;
//! this module validates, routes reservation ids to their SKU, and records metrics.
//! It knows nothing of HTTP.

use sqlx::mysql::MySqlPool;

use crate::auth::Caller;
use crate::batcher::{Batcher, IdempotencyProbes, Reserves};
use crate::config::GatewaySettings;
use crate::db;
use crate::error::{Error, Result};
use crate::ids::{self, SkuId};
use crate::reservation::{Compensation, Refusal, Reservation, Sku, SkuDefinition};
use crate::sold_out::SoldOutFlags;
use crate::store::{ConfirmOutcome, ReserveOutcome, ReserveRequest, Store};
use crate::telemetry;
use std::sync::Arc;

#[derive(Clone)]
pub struct Gateway {
    pub store: Store,
    pub db: MySqlPool,
    pub settings: GatewaySettings,
    sold_out: Arc<SoldOutFlags>,
    reserves: Arc<Batcher<Reserves>>,
    replay_probes: Arc<Batcher<IdempotencyProbes>>,
}

/// A reservation id that is not ours is simply not found.
fn sku_of(reservation_id: &str) -> Result<SkuId> {
    ids::sku_of_reservation(reservation_id).ok_or(Error::Refused(Refusal::NotFound))
}

impl Gateway {
    pub fn new(store: Store, db: MySqlPool, settings: GatewaySettings) -> Gateway {
        let reserves = Arc::new(Batcher::new(Reserves {
            store: store.clone(),
            idempotency_ttl_ms: settings.idempotency_ttl.as_millis() as u64,
        }));
        let replay_probes = Arc::new(Batcher::new(IdempotencyProbes {
            store: store.clone(),
        }));
        Gateway {
            store,
            db,
            settings,
            sold_out: Default::default(),
            reserves,
            replay_probes,
        }
    }

    /// Returns the reservation and whether it is an idempotent replay.
    pub async fn reserve(
        &self,
        sku: &SkuId,
        user_id: &str,
        quantity: u64,
        idempotency_key: &str,
    ) -> Result<(Reservation, bool)> {
        // The flag spares the script, not the replay: a key that created a hold
        // still gets its reservation back. The probes of a burst share one MGET.
        if self.sold_out.is_sold_out(sku, quantity)
            && !self
                .replay_probes
                .submit(sku, (user_id.to_owned(), idempotency_key.to_owned()))
                .await?
        {
            return Err(Error::Refused(Refusal::SoldOut));
        }
        let request = ReserveRequest {
            user_id: user_id.to_owned(),
            quantity,
            idempotency_key: idempotency_key.to_owned(),
            reservation_id: ids::new_reservation_id(sku),
        };
        let outcome = self.reserves.submit(sku, request).await;
        if let Err(Error::Refused(Refusal::SoldOut)) = &outcome {
            self.sold_out.raise(sku, quantity);
        }
        Ok(match outcome? {
            ReserveOutcome::Created(r) => {
                telemetry::transition("held");
                (r, false)
            }
            ReserveOutcome::Replayed(r) => (r, true),
        })
    }

    /// A confirm that cannot become a sale answers `RefundRequired` (the compensation
    /// exists, in the outbox, before the answer leaves).
    pub async fn confirm(&self, reservation_id: &str, payment_ref: &str) -> Result<Reservation> {
        let sku = sku_of(reservation_id)?;
        let compensation_id = ids::new_compensation_id();
        let outcome = self
            .store
            .confirm(&sku, reservation_id, payment_ref, &compensation_id)
            .await?;
        self.wait_for_replicas().await?;
        match outcome {
            ConfirmOutcome::Confirmed(t) => {
                if t.changed {
                    telemetry::transition("confirmed");
                }
                Ok(t.reservation)
            }
            ConfirmOutcome::Refused {
                refusal,
                compensation_id,
            } => {
                telemetry::compensation_recorded(refusal.code());
                Err(Error::RefundRequired {
                    refusal,
                    compensation_id,
                })
            }
        }
    }

    pub async fn cancel(&self, reservation_id: &str, caller: &Caller) -> Result<Reservation> {
        let sku = sku_of(reservation_id)?;
        let t = self
            .store
            .cancel(&sku, reservation_id, caller.user_id())
            .await?;
        if t.changed {
            self.sold_out.lower(&sku);
            telemetry::transition(t.reservation.status.as_str());
        }
        Ok(t.reservation)
    }

    pub async fn payment_pending(
        &self,
        reservation_id: &str,
        payment_ref: &str,
    ) -> Result<Reservation> {
        let sku = sku_of(reservation_id)?;
        let grace_ms = self.settings.payment_grace.as_millis() as u64;
        let t = self
            .store
            .payment_pending(&sku, reservation_id, payment_ref, grace_ms)
            .await?;
        if t.changed {
            telemetry::transition("paying");
        }
        Ok(t.reservation)
    }

    /// Another user's reservation is not found, exactly like a missing one.
    pub async fn reservation(&self, reservation_id: &str, caller: &Caller) -> Result<Reservation> {
        let sku = sku_of(reservation_id)?;
        let r = self.store.reservation(&sku, reservation_id).await?;
        match caller.user_id() {
            Some(user) if user != r.user_id => Err(Error::Refused(Refusal::NotFound)),
            _ => Ok(r),
        }
    }

    pub async fn sku(&self, sku: &SkuId) -> Result<Sku> {
        self.store.sku(sku).await
    }

    /// MySQL first (the source of truth for stock_total), Redis inside the same
    /// transaction: a refusal or failure in Redis rolls the MySQL write back, and the
    /// row lock orders concurrent writes of one SKU.
    pub async fn define_sku(&self, sku: &SkuId, definition: &SkuDefinition) -> Result<Sku> {
        let mut tx = self.db.begin().await?;
        let sold_in_mysql = db::upsert_sku(&mut tx, sku, definition).await?;
        let (loaded, created) = self.store.load_sku(sku, definition, sold_in_mysql).await?;
        if created && sold_in_mysql > 0 {
            // Redis lost this SKU (a wipe before any reconcile): its buyers' limits
            // must still count what they bought.
            let bought = db::sold_per_user(&mut tx, sku).await?;
            self.store.restore_usage(sku, &bought).await?;
        }
        tx.commit().await?;
        self.sold_out.lower(sku);
        telemetry::available_stock(sku.as_str(), loaded.available);
        Ok(loaded)
    }

    pub async fn compensations(
        &self,
        resolved: Option<bool>,
        sku: Option<&SkuId>,
        limit: u32,
    ) -> Result<Vec<Compensation>> {
        db::list_compensations(&self.db, resolved, sku, limit).await
    }

    pub async fn resolve_compensation(&self, id: &str) -> Result<Compensation> {
        db::resolve_compensation(&self.db, id)
            .await?
            .ok_or(Error::Refused(Refusal::NotFound))
    }

    async fn wait_for_replicas(&self) -> Result<()> {
        let settings = &self.settings;
        let acknowledged = self
            .store
            .wait_for_replicas(
                settings.wait_replicas,
                settings.wait_timeout.as_millis() as u64,
            )
            .await?;
        if acknowledged {
            Ok(())
        } else {
            Err(Error::Unavailable(format!(
                "fewer than {} replicas acknowledged in {:?}; retry with the same payment_ref",
                settings.wait_replicas, settings.wait_timeout
            )))
        }
    }
}
