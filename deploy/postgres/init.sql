-- One database per service (each service owns its store; TUNEFORGE_<SERVICE>_DATABASE_URL points
-- at its own). Run once by the postgres image on an empty data volume.
CREATE DATABASE dataset_builder;
CREATE DATABASE job_scheduler;
CREATE DATABASE trainer;
CREATE DATABASE model_registry;
CREATE DATABASE notifier;
