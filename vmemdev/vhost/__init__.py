"""A generic vhost-user back-end engine, sans-IO (see ``engine``)."""
