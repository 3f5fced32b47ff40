package postgres

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/sandboxd/sandboxd/internal/store"
)

const replicaCols = `id, address, started_at, heartbeat_at, lost_at`

// Replica times are the database server's clock (clock_timestamp()), so that replicas on hosts
// whose clocks differ agree on who is stale.

// RegisterReplica records replica id as alive at address, now (see store.Store).
func (d *DB) RegisterReplica(ctx context.Context, id, address string) error {
	_, err := d.db.ExecContext(ctx, `INSERT INTO replicas (`+replicaCols+`)
		VALUES ($1, $2, clock_timestamp(), clock_timestamp(), NULL)
		ON CONFLICT (id) DO UPDATE SET address = excluded.address, started_at = excluded.started_at,
			heartbeat_at = excluded.heartbeat_at, lost_at = NULL`, id, address)
	if err != nil {
		return fmt.Errorf("register replica %s: %w", id, classify(err))
	}
	return nil
}

// Heartbeat records that replica id is alive now; store.ErrReplicaLost if it is lost or unknown.
func (d *DB) Heartbeat(ctx context.Context, id string) error {
	res, err := d.db.ExecContext(ctx, `UPDATE replicas SET heartbeat_at = clock_timestamp() WHERE id = $1 AND lost_at IS NULL`, id)
	if err != nil {
		return fmt.Errorf("heartbeat of replica %s: %w", id, classify(err))
	}
	if n, err := res.RowsAffected(); err != nil {
		return fmt.Errorf("heartbeat of replica %s: %w", id, err)
	} else if n == 0 {
		return fmt.Errorf("heartbeat of replica %s: %w", id, store.ErrReplicaLost)
	}
	return nil
}

// MarkStaleReplicas declares lost, in one statement, the replicas not lost whose last heartbeat is
// older than staleAfter, and returns them.
func (d *DB) MarkStaleReplicas(ctx context.Context, staleAfter time.Duration) ([]store.Replica, error) {
	out, err := queryAll(ctx, d.db, scanReplica, `UPDATE replicas SET lost_at = clock_timestamp()
		WHERE lost_at IS NULL AND heartbeat_at <= clock_timestamp() - make_interval(secs => $1)
		RETURNING `+replicaCols, staleAfter.Seconds())
	if err != nil {
		return nil, fmt.Errorf("mark stale replicas: %w", classify(err))
	}
	slices.SortFunc(out, func(a, b store.Replica) int { return a.StartedAt.Compare(b.StartedAt) })
	return out, nil
}

// Replicas returns every registered replica, oldest first.
func (d *DB) Replicas(ctx context.Context) ([]store.Replica, error) {
	out, err := queryAll(ctx, d.db, scanReplica, `SELECT `+replicaCols+` FROM replicas ORDER BY started_at, id`)
	if err != nil {
		return nil, fmt.Errorf("replicas: %w", classify(err))
	}
	return out, nil
}

func scanReplica(s scanner) (store.Replica, error) {
	var r store.Replica
	var lost sql.NullTime
	if err := s.Scan(&r.ID, &r.Address, &r.StartedAt, &r.HeartbeatAt, &lost); err != nil {
		return store.Replica{}, err
	}
	r.StartedAt, r.HeartbeatAt, r.LostAt = r.StartedAt.UTC(), r.HeartbeatAt.UTC(), nullTime(lost)
	return r, nil
}

// lock is a session advisory lock held on conn, a connection taken out of the pool for it.
type lock struct {
	conn *sql.Conn
	name string
	once sync.Once
}

// TryLock takes the session advisory lock (lockClassLeader, hashtext(name)) on a connection of its
// own; nil if another session holds it. Names that hash alike share a lock: the service's few
// fixed names do not.
func (d *DB) TryLock(ctx context.Context, name string) (store.Lock, error) {
	conn, err := d.db.Conn(ctx)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", name, classify(err))
	}
	var got bool
	if err := conn.QueryRowContext(ctx, `SELECT pg_try_advisory_lock($1, hashtext($2))`, lockClassLeader, name).Scan(&got); err != nil {
		discard(conn)
		return nil, fmt.Errorf("lock %s: %w", name, classify(err))
	}
	if !got {
		conn.Close()
		return nil, nil
	}
	return &lock{conn: conn, name: name}, nil
}

// Release unlocks and gives the connection back to the pool; if the unlock fails, the connection
// is closed instead (ending the session ends its locks).
func (l *lock) Release() {
	l.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		var ok bool
		if err := l.conn.QueryRowContext(ctx, `SELECT pg_advisory_unlock($1, hashtext($2))`, lockClassLeader, l.name).Scan(&ok); err != nil || !ok {
			discard(l.conn)
			return
		}
		l.conn.Close()
	})
}

// discard closes conn's session rather than returning it to the pool.
func discard(conn *sql.Conn) {
	_ = conn.Raw(func(any) error { return driver.ErrBadConn })
	conn.Close()
}
