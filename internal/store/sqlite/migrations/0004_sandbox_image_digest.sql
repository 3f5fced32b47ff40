-- The digest of the image a sandbox ran ("sha256:<hex>"; "" when its image has none recorded):
-- `sandboxd images rm` refuses an image a live sandbox runs.
ALTER TABLE sandboxes ADD COLUMN image_digest TEXT NOT NULL DEFAULT '';
