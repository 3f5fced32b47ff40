package k8stest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// pki is the cluster's certificate authority, which signs every serving and client certificate
// of the cluster; its files are under dir.
type pki struct {
	dir    string
	ca     *x509.Certificate
	caKey  *ecdsa.PrivateKey
	caPEM  []byte
	serial int64
}

// newPKI makes a CA valid for a day and writes ca.crt and ca.key into dir.
func newPKI(dir string) (*pki, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "sandboxd-k8stest-ca"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	ca, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	p := &pki{dir: dir, ca: ca, caKey: key, caPEM: pemOf("CERTIFICATE", der), serial: 1}
	if err := p.write("ca", p.caPEM, key); err != nil {
		return nil, err
	}
	return p, nil
}

// issued is a certificate and its key, PEM-encoded, and where they were written.
type issued struct {
	certPEM, keyPEM   []byte
	certFile, keyFile string
}

// issue signs a certificate for cn in the groups orgs, for serving at hosts (IP addresses or DNS
// names; none: a client certificate), and writes it as name.crt and name.key.
func (p *pki) issue(name, cn string, orgs []string, hosts ...string) (issued, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return issued{}, err
	}
	p.serial++
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(p.serial),
		Subject:      pkix.Name{CommonName: cn, Organization: orgs},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if len(hosts) > 0 {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.ca, &key.PublicKey, p.caKey)
	if err != nil {
		return issued{}, err
	}
	certPEM := pemOf("CERTIFICATE", der)
	if err := p.write(name, certPEM, key); err != nil {
		return issued{}, err
	}
	keyDER, _ := x509.MarshalECPrivateKey(key)
	return issued{certPEM: certPEM, keyPEM: pemOf("EC PRIVATE KEY", keyDER),
		certFile: filepath.Join(p.dir, name+".crt"), keyFile: filepath.Join(p.dir, name+".key")}, nil
}

// serviceAccountKey writes the key pair that signs service-account tokens: sa.key, sa.pub.
func (p *pki) serviceAccountKey() error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(p.dir, "sa.pub"), pemOf("PUBLIC KEY", pub), 0o600); err != nil {
		return err
	}
	return p.write("sa", nil, key)
}

// write writes name.crt (when certPEM is not nil) and name.key, readable by root alone.
func (p *pki) write(name string, certPEM []byte, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	if certPEM != nil {
		if err := os.WriteFile(filepath.Join(p.dir, name+".crt"), certPEM, 0o600); err != nil {
			return err
		}
	}
	return os.WriteFile(filepath.Join(p.dir, name+".key"), pemOf("EC PRIVATE KEY", der), 0o600)
}

func pemOf(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

// kubeconfig writes file, a kubeconfig that reaches the apiserver at server as the user of
// cert, and returns the client-go config of the same.
func (p *pki) kubeconfig(file, server string, cert issued) (*rest.Config, error) {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["k8stest"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: p.caPEM}
	cfg.AuthInfos["k8stest"] = &clientcmdapi.AuthInfo{ClientCertificateData: cert.certPEM, ClientKeyData: cert.keyPEM}
	cfg.Contexts["k8stest"] = &clientcmdapi.Context{Cluster: "k8stest", AuthInfo: "k8stest"}
	cfg.CurrentContext = "k8stest"
	if err := clientcmd.WriteToFile(*cfg, file); err != nil {
		return nil, fmt.Errorf("write %s: %w", file, err)
	}
	return &rest.Config{
		Host:            server,
		TLSClientConfig: rest.TLSClientConfig{CAData: p.caPEM, CertData: cert.certPEM, KeyData: cert.keyPEM},
		QPS:             100,
		Burst:           200,
	}, nil
}
