package sandbox

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/driver"
)

type got struct {
	stream string
	data   string
	at     Offsets
}

func collect(t *testing.T, l *outputLog, at Offsets) []got {
	t.Helper()
	var out []got
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := l.follow(ctx, at, func(s driver.Stream, p []byte, at Offsets) error {
		out = append(out, got{string(s), string(p), at})
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestOutputLogFollow(t *testing.T) {
	l := newOutputLog()
	l.add(driver.Stdout, []byte("one\n"))
	l.add(driver.Stderr, []byte("warn\n"))
	l.add(driver.Stdout, []byte("two\n"))
	l.finish()
	for _, tc := range []struct {
		name string
		at   Offsets
		want []got
	}{
		{"from the start", Offsets{}, []got{
			{"stdout", "one\n", Offsets{4, 0}}, {"stderr", "warn\n", Offsets{4, 5}}, {"stdout", "two\n", Offsets{8, 5}}}},
		{"resumed after the first", Offsets{4, 0}, []got{
			{"stderr", "warn\n", Offsets{4, 5}}, {"stdout", "two\n", Offsets{8, 5}}}},
		{"resumed mid-chunk", Offsets{6, 5}, []got{{"stdout", "o\n", Offsets{8, 5}}}},
		{"all seen", Offsets{8, 5}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := collect(t, l, tc.at)
			if len(g) != len(tc.want) {
				t.Fatalf("got %v, want %v", g, tc.want)
			}
			for i := range g {
				if g[i] != tc.want[i] {
					t.Errorf("event %d: %v, want %v", i, g[i], tc.want[i])
				}
			}
		})
	}
}

// A live follower gets chunks as they are added, never a split UTF-8 character.
func TestOutputLogLive(t *testing.T) {
	l := newOutputLog()
	euro := []byte("€") // 3 bytes
	events := make(chan got, 10)
	go func() {
		l.follow(context.Background(), Offsets{}, func(s driver.Stream, p []byte, at Offsets) error {
			events <- got{string(s), string(p), at}
			return nil
		})
		close(events)
	}()
	l.add(driver.Stdout, append([]byte("price "), euro[:1]...))
	if e := <-events; e.data != "price " || e.at != (Offsets{6, 0}) {
		t.Fatalf("first: %v", e)
	}
	l.add(driver.Stdout, euro[1:])
	if e := <-events; e.data != "€" || e.at != (Offsets{9, 0}) {
		t.Fatalf("second: %v", e)
	}
	l.add(driver.Stdout, euro[:2]) // cut at the end of the run: delivered as it is
	l.finish()
	var rest []string
	for e := range events {
		rest = append(rest, e.data)
	}
	if strings.Join(rest, "") != string(euro[:2]) {
		t.Fatalf("rest %q", rest)
	}
}
