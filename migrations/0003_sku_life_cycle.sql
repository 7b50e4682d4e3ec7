-- The reconciler visits SKUs whose sale has not ended (plus those Redis still has on
-- sale), not every SKU ever defined: this index keeps that lookup cheap with history.
CREATE INDEX skus_by_ends_at ON skus (ends_at);
