-- A SKU's waiting room (src/queue.rs): its terms as JSON
-- {"admission_seconds", "admit_per_second", "prequeue_shuffle"}; NULL: none. The queue
-- itself lives in Redis only: after a Redis loss buyers join again.
ALTER TABLE skus ADD COLUMN waiting_room VARCHAR(255) NULL;
