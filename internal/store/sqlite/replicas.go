package sqlite

import (
	"context"
	"database/sql"
	"fmt"
	"sync"
	"time"

	"github.com/sandboxd/sandboxd/internal/store"
)

const replicaCols = `id, address, started_at, heartbeat_at, lost_at`

// RegisterReplica records replica id as alive at address, now (see store.Store).
func (d *DB) RegisterReplica(ctx context.Context, id, address string) error {
	t := time.Now().UTC().Format(timeLayout)
	_, err := d.exec(ctx, nil, `INSERT INTO replicas (`+replicaCols+`) VALUES (?, ?, ?, ?, NULL)
		ON CONFLICT (id) DO UPDATE SET address = excluded.address, started_at = excluded.started_at,
			heartbeat_at = excluded.heartbeat_at, lost_at = NULL`, id, address, t, t)
	if err != nil {
		return fmt.Errorf("register replica %s: %w", id, classify(err))
	}
	return nil
}

// Heartbeat records that replica id is alive now; store.ErrReplicaLost if it is lost or unknown.
func (d *DB) Heartbeat(ctx context.Context, id string) error {
	res, err := d.exec(ctx, nil, `UPDATE replicas SET heartbeat_at = ? WHERE id = ? AND lost_at IS NULL`,
		time.Now().UTC().Format(timeLayout), id)
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

// MarkStaleReplicas declares lost, in one write transaction, the replicas not lost whose last
// heartbeat is older than staleAfter (by this process's clock), and returns them.
func (d *DB) MarkStaleReplicas(ctx context.Context, staleAfter time.Duration) ([]store.Replica, error) {
	now := time.Now().UTC()
	cutoff := now.Add(-staleAfter).Format(timeLayout)
	var out []store.Replica
	err := d.write(ctx, func(tx *sql.Tx) error {
		var err error
		out, err = queryReplicas(ctx, tx, `SELECT `+replicaCols+` FROM replicas
			WHERE lost_at IS NULL AND heartbeat_at < ? ORDER BY started_at, id`, cutoff)
		if err != nil {
			return err
		}
		for i := range out {
			out[i].LostAt = &now
			if _, err := tx.ExecContext(ctx, `UPDATE replicas SET lost_at = ? WHERE id = ?`,
				now.Format(timeLayout), out[i].ID); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("mark stale replicas: %w", classify(err))
	}
	return out, nil
}

// Replicas returns every registered replica, oldest first.
func (d *DB) Replicas(ctx context.Context) ([]store.Replica, error) {
	out, err := queryReplicas(ctx, d.r, `SELECT `+replicaCols+` FROM replicas ORDER BY started_at, id`)
	if err != nil {
		return nil, fmt.Errorf("replicas: %w", classify(err))
	}
	return out, nil
}

func queryReplicas(ctx context.Context, q querier, query string, args ...any) ([]store.Replica, error) {
	rows, err := q.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []store.Replica
	for rows.Next() {
		var r store.Replica
		var started, beat string
		var lost sql.NullString
		if err := rows.Scan(&r.ID, &r.Address, &started, &beat, &lost); err != nil {
			return nil, err
		}
		if r.StartedAt, err = parseTime(started); err != nil {
			return nil, err
		}
		if r.HeartbeatAt, err = parseTime(beat); err != nil {
			return nil, err
		}
		if r.LostAt, err = parsePtime(lost); err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

// locks are the leadership locks held in this process, by database file and name. A SQLite
// database is served by one process (serve locks its data directory), so a lock of this process
// is the only one there is.
var locks sync.Map // lockKey → struct{}

type lockKey struct{ file, name string }

type lock struct {
	key  lockKey
	once sync.Once
}

func (l *lock) Release() { l.once.Do(func() { locks.Delete(l.key) }) }

// TryLock takes the lock called name of this database file, if no Store of this process holds
// it; nil when one does.
func (d *DB) TryLock(ctx context.Context, name string) (store.Lock, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("lock %s: %w", name, err)
	}
	k := lockKey{d.path, name}
	if _, held := locks.LoadOrStore(k, struct{}{}); held {
		return nil, nil
	}
	return &lock{key: k}, nil
}
