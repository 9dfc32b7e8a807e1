-- A running firing names its holder (a process identity plus a random
-- part, see src/liveness.rs), so only the holder renews or finishes it and
-- a holder that died on this machine is taken over at once.
ALTER TABLE schedule_firings ADD COLUMN holder TEXT;
