-- Issue 13: a SKU's stock may be split over `buckets` Redis hash slots (src/buckets.rs).
-- Fixed when the SKU is created: a PUT that changes it answers 409 `buckets_changed`.
ALTER TABLE skus ADD COLUMN buckets INT UNSIGNED NOT NULL DEFAULT 1;
